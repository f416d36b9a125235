"""diffusers' AutoencoderDC (the Deep Compression Autoencoder of Sana: 32x down, 32 channels) in Linen, NHWC.

Residual autoencoding: every down (up) step adds a parameter-free shortcut, space-to-channel (channel-to-space)
with channels averaged (repeated) to the new width, so the convolutions learn a residual. Blocks: ResBlock (conv,
act, conv, RMSNorm over channels) at the high resolutions, EfficientViT blocks (ReLU linear attention over q / k /
v and their multi-scale depthwise aggregates, then a GLU MBConv) at the low ones. Module names follow diffusers'
state-dict keys (a Sequential's index `3` is the module `3`), so `convert/diffusers_dc_ae.py` maps names only.
Channel orders follow PyTorch's pixel_(un)shuffle and reshapes exactly: the weights were trained on them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
  """diffusers' AutoencoderDC fields (dc-ae-f32c32-sana-1.0's values by default)."""
  in_channels: int = 3
  latent_channels: int = 32
  attention_head_dim: int = 32
  encoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
  decoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
  encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
  decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
  encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
  decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
  encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
  decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
  upsample_block_type: str = "interpolate"  # or "pixel_shuffle"
  downsample_block_type: str = "Conv"  # or "pixel_unshuffle"
  decoder_act_fns: tuple[str, ...] = ("silu",) * 6
  scaling_factor: float = 0.41407

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.encoder_block_out_channels) - 1)


ACTIVATIONS = {"silu": nn.silu, "relu": nn.relu, "relu6": jax.nn.relu6, "gelu": nn.gelu}


class PointwiseConv(nn.Module):
  """A 1 x 1 convolution as the matmul it is, with nn.Conv's parameters (kernel [1, 1, in, out], bias [out]):
  XLA:CPU computes a convolution's kernel gradient as a full-window convolution, 10 s where the matmul takes
  0.05 (Sana 1.6 B's 2240 -> 11200 on 16 x 16)."""
  features: int
  bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", layers.logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                   (1, 1, x.shape[-1], self.features), jnp.float32)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), w[0, 0].astype(self.dtype))
    if self.bias:
      y = y + self.param("bias", layers.logical(nn.initializers.zeros_init(), ("embed",)), (self.features,),
                         jnp.float32).astype(self.dtype)
    return y


class DepthwiseConv(nn.Module):
  """PyTorch's Conv2d(c, c, k, padding=k // 2, groups=c) as k x k shifted multiply-adds, with nn.Conv's parameters
  (kernel [k, k, 1, c], bias [c]): XLA:CPU differentiates a grouped convolution ~300x slower than these sums (14 s
  vs 0.05 s at Sana 1.6 B's 11200 channels on 16 x 16), and on accelerators the sums are one fused loop."""
  kernel: int = 3
  bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, k, p = x.shape[-1], self.kernel, self.kernel // 2
    w = self.param("kernel", layers.logical(nn.initializers.lecun_normal(), (None, None, None, "embed")), (k, k, 1, c),
                   jnp.float32)
    h, wd = x.shape[1:3]
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (p, p), (p, p), (0, 0)))
    out = sum(xp[:, i:i + h, j:j + wd] * w[i, j, 0] for i in range(k) for j in range(k))
    if self.bias:
      out = out + self.param("bias", layers.logical(nn.initializers.zeros_init(), ("embed",)), (c,), jnp.float32)
    return out.astype(self.dtype)


def conv(features: int, kernel: int = 3, stride: int = 1, groups: int = 1, bias: bool = True, dtype=jnp.float32,
         name: str | None = None) -> nn.Module:
  """PyTorch's Conv2d(kernel, stride, padding=kernel // 2, groups)."""
  if kernel == 1 and stride == 1 and groups == 1:
    return PointwiseConv(features, bias, dtype, name=name)
  if groups == features > 1 and stride == 1:  # depthwise (PyTorch's in = out = groups)
    return DepthwiseConv(kernel, bias, dtype, name=name)
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)), feature_group_count=groups,
                 use_bias=bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                 kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                 bias_init=layers.logical(nn.initializers.zeros_init(), ("embed",)))


class RMSNorm(nn.Module):
  """diffusers' RMSNorm(eps=1e-5, elementwise_affine, bias) over the last (channel) axis, in float32."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    w = self.param("weight", layers.logical(nn.initializers.ones_init(), ("embed",)), (d,), jnp.float32)
    b = self.param("bias", layers.logical(nn.initializers.zeros_init(), ("embed",)), (d,), jnp.float32)
    y = x.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
    return (y * w + b).astype(x.dtype)


def space_to_channels(x, f: int = 2):
  """PyTorch's pixel_unshuffle on NHWC: channel c, offset (i, j) -> channel c f^2 + i f + j."""
  b, h, w, c = x.shape
  return x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // f, w // f, c * f * f)


def channels_to_space(x, f: int = 2):
  """PyTorch's pixel_shuffle on NHWC (the inverse of `space_to_channels`)."""
  b, h, w, c = x.shape
  return x.reshape(b, h, w, c // (f * f), f, f).transpose(0, 1, 4, 2, 5, 3).reshape(b, h * f, w * f, c // (f * f))


def group_mean(x, groups_of: int):
  """Consecutive channels averaged in groups (PyTorch's unflatten(1, (-1, g)).mean(2))."""
  b, h, w, c = x.shape
  return x.reshape(b, h, w, c // groups_of, groups_of).mean(axis=-1)


class ResBlock(nn.Module):
  out_channels: int
  act: str = "silu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = conv(x.shape[-1], dtype=self.dtype, name="conv1")(x)
    h = conv(self.out_channels, bias=False, dtype=self.dtype, name="conv2")(ACTIVATIONS[self.act](h))
    return RMSNorm(name="norm")(h) + x


class MultiscaleProjection(nn.Module):
  """A depthwise k x k conv, then a 1 x 1 conv grouped per head of q, k and v."""
  heads: int
  kernel: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = conv(c, self.kernel, groups=c, bias=False, dtype=self.dtype, name="proj_in")(x)
    return conv(c, 1, groups=3 * self.heads, bias=False, dtype=self.dtype, name="proj_out")(x)


class LinearAttention(nn.Module):
  """SanaMultiscaleLinearAttention (residual, RMSNorm out): ReLU linear attention, quadratic where the image has no
  more positions than a head has channels (as diffusers switches)."""
  head_dim: int
  kernel_sizes: tuple[int, ...] = (5,)
  eps: float = 1e-15
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    heads = c // self.head_dim
    inner = heads * self.head_dim
    dense = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                                  kernel_init=layers.logical(nn.initializers.lecun_normal(), ("embed", "mlp")))
    qkv = jnp.concatenate([dense("to_q")(x), dense("to_k")(x), dense("to_v")(x)], axis=-1)
    scales = [qkv] + [MultiscaleProjection(heads, k, self.dtype, name=f"to_qkv_multiscale_{i}")(qkv)
                      for i, k in enumerate(self.kernel_sizes)]
    n, d = h * w, self.head_dim
    # channels in groups of 3 d: (q, k, v) of one head each, as PyTorch's reshape(B, -1, 3 d, N) reads them
    g = jnp.concatenate(scales, axis=-1).astype(jnp.float32).reshape(b, n, -1, 3, d)
    q, k, v = g[..., 0, :], g[..., 1, :], g[..., 2, :]  # [B, N, G, d]
    if n > d:
      out = layers.relu_linear_attention(q, k, v, self.eps)
    else:  # quadratic: scores relu(k)^T relu(q) normalised over the keys
      q, k = nn.relu(q), nn.relu(k)
      scores = jnp.einsum("bmgj,bngj->bgmn", k, q)
      scores = scores / (jnp.sum(scores, axis=2, keepdims=True) + self.eps)
      out = jnp.einsum("bmgi,bgmn->bngi", v, scores)
    out = out.reshape(b, h, w, -1).astype(self.dtype)
    out = nn.Dense(c, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="to_out",
                   kernel_init=layers.logical(nn.initializers.lecun_normal(), ("mlp", "embed")))(out)
    return RMSNorm(name="norm_out")(out) + x


class GLUMBConv(nn.Module):
  """1 x 1 expansion to 2 x expand x channels, SiLU, depthwise 3 x 3, SiLU-gated halves, 1 x 1 back; then RMSNorm
  and the residual (the DC-AE's; Sana's transformer FFN has neither)."""
  expand: float = 4
  norm_and_residual: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    hidden = int(self.expand * c)
    h = nn.silu(conv(2 * hidden, 1, dtype=self.dtype, name="conv_inverted")(x))
    h = conv(2 * hidden, 3, groups=2 * hidden, dtype=self.dtype, name="conv_depth")(h)
    h, gate = jnp.split(h, 2, axis=-1)
    h = conv(c, 1, bias=False, dtype=self.dtype, name="conv_point")(h * nn.silu(gate))
    return RMSNorm(name="norm")(h) + x if self.norm_and_residual else h


class EfficientViTBlock(nn.Module):
  head_dim: int
  kernel_sizes: tuple[int, ...]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = LinearAttention(self.head_dim, self.kernel_sizes, dtype=self.dtype, name="attn")(x)
    return GLUMBConv(dtype=self.dtype, name="conv_out")(x)


class DownBlock(nn.Module):
  """DCDownBlock2d: a stride-2 conv (or a conv then space-to-channels) plus the averaged space-to-channels
  shortcut."""
  out_channels: int
  unshuffle: bool
  shortcut: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = self.out_channels // 4 if self.unshuffle else self.out_channels
    y = conv(out, 3, 1 if self.unshuffle else 2, dtype=self.dtype, name="conv")(x)
    if self.unshuffle:
      y = space_to_channels(y)
    if self.shortcut:
      y = y + group_mean(space_to_channels(x), x.shape[-1] * 4 // self.out_channels)
    return y


class UpBlock(nn.Module):
  """DCUpBlock2d: nearest 2x then a conv (or a conv then channels-to-space) plus the repeated channels-to-space
  shortcut."""
  out_channels: int
  interpolate: bool
  shortcut: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.interpolate:
      y = conv(self.out_channels, dtype=self.dtype, name="conv")(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    else:
      y = channels_to_space(conv(self.out_channels * 4, dtype=self.dtype, name="conv")(x))
    if self.shortcut:
      y = y + channels_to_space(jnp.repeat(x, self.out_channels * 4 // x.shape[-1], axis=-1))
    return y


def _block(kind: str, channels: int, cfg: DCAEConfig, scales, act: str, dtype, name: str) -> nn.Module:
  if kind == "ResBlock":
    return ResBlock(channels, act, dtype, name=name)
  return EfficientViTBlock(cfg.attention_head_dim, tuple(scales), dtype, name=name)


class Encoder(nn.Module):
  cfg: DCAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    widths, depths, n = c.encoder_block_out_channels, c.encoder_layers_per_block, len(c.encoder_block_out_channels)
    unshuffle = c.downsample_block_type == "pixel_unshuffle"
    if depths[0] > 0:
      x = conv(widths[0], dtype=self.dtype, name="conv_in")(x)
    else:
      x = DownBlock(widths[1], unshuffle, shortcut=False, dtype=self.dtype, name="conv_in")(x)
    for i, (width, depth) in enumerate(zip(widths, depths)):
      for j in range(depth):  # diffusers' Sequential: the blocks, then the downsampler, numbered in order
        x = _block(c.encoder_block_types[i], width, c, c.encoder_qkv_multiscales[i], "silu", self.dtype,
                   f"down_blocks_{i}_{j}")(x)
      if i < n - 1 and depth > 0:
        x = DownBlock(widths[i + 1], unshuffle, dtype=self.dtype, name=f"down_blocks_{i}_{depth}")(x)
    return conv(c.latent_channels, dtype=self.dtype, name="conv_out")(x) + group_mean(x, widths[-1] // c.latent_channels)


class Decoder(nn.Module):
  cfg: DCAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    c = self.cfg
    widths, depths, n = c.decoder_block_out_channels, c.decoder_layers_per_block, len(c.decoder_block_out_channels)
    interpolate = c.upsample_block_type == "interpolate"
    x = conv(widths[-1], dtype=self.dtype, name="conv_in")(z) + jnp.repeat(z, widths[-1] // z.shape[-1], axis=-1)
    for i in reversed(range(n)):
      first = 0
      if i < n - 1 and depths[i] > 0:
        x = UpBlock(widths[i], interpolate, dtype=self.dtype, name=f"up_blocks_{i}_0")(x)
        first = 1
      for j in range(depths[i]):
        x = _block(c.decoder_block_types[i], widths[i], c, c.decoder_qkv_multiscales[i], c.decoder_act_fns[i],
                   self.dtype, f"up_blocks_{i}_{first + j}")(x)
    x = nn.relu(RMSNorm(name="norm_out")(x))
    if depths[0] > 0:
      return conv(c.in_channels, dtype=self.dtype, name="conv_out")(x)
    return UpBlock(c.in_channels, interpolate, shortcut=False, dtype=self.dtype, name="conv_out")(x)


class AutoencoderDC(nn.Module):
  """encode: images [-1, 1] NHWC -> latents (unscaled); decode: latents -> images."""
  cfg: DCAEConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.cfg, self.dtype)
    self.decoder = Decoder(self.cfg, self.dtype)

  def encode(self, x):
    return self.encoder(x.astype(self.dtype)).astype(jnp.float32)

  def decode(self, z):
    return self.decoder(z.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, x):
    return self.decode(self.encode(x))
