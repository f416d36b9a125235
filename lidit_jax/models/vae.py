"""diffusers' `AutoencoderKL` in Flax Linen, NHWC: the latent space of SD 1.x / 2.x, SDXL, SD3 and Flux.

The layout is diffusers' (ResnetBlock2D, DownEncoderBlock2D, UNetMidBlock2D with one single-head attention,
UpDecoderBlock2D; GroupNorm eps 1e-6 everywhere), and the submodule names follow its state-dict keys
(`encoder/down_blocks_0/resnets_1/conv1` is `encoder.down_blocks.0.resnets.1.conv1`), so conversion is a
rename plus OIHW -> HWIO. `encode` returns the posterior's mean and `decode` the decoder's output, both
unscaled: the latent scaling (`scaling_factor`, `shift_factor`, `latents_mean` / `latents_std`) is the
autoencoder's job, which reads them from this config.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.models import layers

Dtype = layers.Dtype
EPS = 1e-6  # every GroupNorm of diffusers' VAE encoder and decoder


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """diffusers' AutoencoderKL config.json fields (defaults: SD 1.x / 2.x's VAE)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None

  def __post_init__(self):
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAE block_out_channels {list(self.block_out_channels)}: {bad} not divisible by "
                       f"norm_num_groups {self.norm_num_groups}. Fix: use multiples of it")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def conv(features: int, kernel: int = 3, stride: int = 1, dtype: Dtype = jnp.float32, name: str | None = None):
  """A conv with diffusers' padding: 'SAME' for stride 1; stride 2 pads bottom / right only (done by the caller)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME" if stride == 1 else "VALID",
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
                 bias_init=layers.logical(nn.initializers.zeros_init(), ("conv_out",)))


def group_norm(groups: int, dtype: Dtype, name: str, eps: float = EPS):
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
                      use_fast_variance=False,
                      scale_init=layers.logical(nn.initializers.ones_init(), ("conv_out",)),
                      bias_init=layers.logical(nn.initializers.zeros_init(), ("conv_out",)))


class ResnetBlock(nn.Module):
  """GroupNorm -> SiLU -> conv, twice, plus the input (through a 1x1 conv when the width changes)."""
  features: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    h = conv(self.features, dtype=self.dtype, name="conv1")(nn.silu(group_norm(self.groups, self.dtype, "norm1")(x_BHWC)))
    h = conv(self.features, dtype=self.dtype, name="conv2")(nn.silu(group_norm(self.groups, self.dtype, "norm2")(h)))
    if x_BHWC.shape[-1] != self.features:
      x_BHWC = conv(self.features, 1, dtype=self.dtype, name="conv_shortcut")(x_BHWC)
    return x_BHWC + h


class SpatialAttention(nn.Module):
  """The mid block's single-head self-attention over all positions, with a residual (softmax in float32)."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    b, hgt, wid, c = x_BHWC.shape
    h_BLC = group_norm(self.groups, self.dtype, "group_norm")(x_BHWC).reshape(b, hgt * wid, c)
    dense = lambda name: layers.Dense(c, axes=("conv_in", "conv_out"), dtype=self.dtype, name=name)
    q, k, v = dense("to_q")(h_BLC), dense("to_k")(h_BLC), dense("to_v")(h_BLC)
    logits_BLS = jnp.einsum("blc,bsc->bls", q, k).astype(jnp.float32) * c ** -0.5
    h_BLC = jnp.einsum("bls,bsc->blc", jax.nn.softmax(logits_BLS, axis=-1).astype(v.dtype), v)
    return x_BHWC + dense("to_out_0")(h_BLC).reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  groups: int
  attention: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    c = x_BHWC.shape[-1]
    x_BHWC = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x_BHWC)
    if self.attention:
      x_BHWC = SpatialAttention(self.groups, self.dtype, name="attentions_0")(x_BHWC)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x_BHWC)


class Downsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))  # diffusers pads bottom and right, then VALID
    return conv(x_BHWC.shape[-1], stride=2, dtype=self.dtype, name="conv")(x_BHWC)


class Upsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)  # nearest, 2x
    return conv(x_BHWC.shape[-1], dtype=self.dtype, name="conv")(x_BHWC)


class Encoder(nn.Module):
  cfg: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    cfg, g = self.cfg, self.cfg.norm_num_groups
    h = conv(cfg.block_out_channels[0], dtype=self.dtype, name="conv_in")(x_BHWC)
    for i, ch in enumerate(cfg.block_out_channels):
      for j in range(cfg.layers_per_block):
        h = ResnetBlock(ch, g, self.dtype, name=f"down_blocks_{i}_resnets_{j}")(h)
      if i < len(cfg.block_out_channels) - 1:
        h = Downsample(self.dtype, name=f"down_blocks_{i}_downsamplers_0")(h)
    h = MidBlock(g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(h)
    h = nn.silu(group_norm(g, self.dtype, "conv_norm_out")(h))
    return conv(2 * cfg.latent_channels, dtype=self.dtype, name="conv_out")(h)  # mean and log-variance


class Decoder(nn.Module):
  cfg: VAEConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z_BhwC):
    cfg, g = self.cfg, self.cfg.norm_num_groups
    widths = cfg.block_out_channels[::-1]
    h = conv(widths[0], dtype=self.dtype, name="conv_in")(z_BhwC)
    h = MidBlock(g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(h)
    for i, ch in enumerate(widths):
      for j in range(cfg.layers_per_block + 1):  # one more resnet per block than the encoder, as diffusers
        h = ResnetBlock(ch, g, self.dtype, name=f"up_blocks_{i}_resnets_{j}")(h)
      if i < len(widths) - 1:
        h = Upsample(self.dtype, name=f"up_blocks_{i}_upsamplers_0")(h)
    h = nn.silu(group_norm(g, self.dtype, "conv_norm_out")(h))
    return conv(cfg.out_channels, dtype=self.dtype, name="conv_out")(h)


class AutoencoderKL(nn.Module):
  """`apply(v, images, method="encode")` -> posterior mean; `method="moments"` -> (mean, logvar);
  `method="decode"` -> images. NHWC, images in [-1, 1], latents unscaled."""
  cfg: VAEConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.cfg
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    self.quant_conv = conv(2 * cfg.latent_channels, 1, dtype=self.dtype) if cfg.use_quant_conv else None
    self.post_quant_conv = conv(cfg.latent_channels, 1, dtype=self.dtype) if cfg.use_post_quant_conv else None

  def moments(self, x_BHWC):
    assert x_BHWC.ndim == 4 and x_BHWC.shape[-1] == self.cfg.in_channels, x_BHWC.shape
    h = self.encoder(x_BHWC)
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, x_BHWC):
    return self.moments(x_BHWC)[0]

  def decode(self, z_BhwC):
    assert z_BhwC.ndim == 4 and z_BhwC.shape[-1] == self.cfg.latent_channels, z_BhwC.shape
    if self.post_quant_conv is not None:
      z_BhwC = self.post_quant_conv(z_BhwC)
    return self.decoder(z_BhwC)

  def __call__(self, x_BHWC):  # init and round trips: the decoded posterior mean
    return self.decode(self.encode(x_BHWC))
