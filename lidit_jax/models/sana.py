"""diffusers' SanaTransformer2DModel (Sana 0.6 B / 1.6 B) in Linen: adaLN-single DiT blocks whose self-attention
is ReLU linear attention (O(N) in the image tokens) and whose FFN is a GLU MBConv over the token grid (1 x 1,
depthwise 3 x 3, gated, 1 x 1: the convolution is the positional signal, so by default there are no position
embeddings), cross-attention to the Gemma caption after a projection and an RMSNorm. Blocks are scanned.

As `models/pixart.py`, two methods: `time(timesteps)` (diffusers' timesteps, as the pipeline passes them, already
times `timestep_scale`) -> the embedded timestep, then `__call__(x, t_emb, context, valid)` -> the prediction.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.models import dc_ae, layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class SanaConfig:
  """diffusers' SanaTransformer2DModel fields (Sana_1600M_1024px's values by default)."""
  in_channels: int = 32
  out_channels: int = 32
  num_attention_heads: int = 70
  attention_head_dim: int = 32
  num_layers: int = 20
  num_cross_attention_heads: int = 20
  cross_attention_head_dim: int = 112
  caption_channels: int = 2304
  mlp_ratio: float = 2.5
  attention_bias: bool = False  # the linear self-attention's q / k / v
  sample_size: int = 32
  patch_size: int = 1
  interpolation_scale: float = 0.0  # > 0: PixArt-style sin-cos positions; 0: none (Sana 1.0)

  @property
  def width(self) -> int:
    return self.num_attention_heads * self.attention_head_dim


class SanaBlock(nn.Module):
  """One block, with nn.scan's (carry, x) -> (carry, y) signature; `grid`: the token grid (h, w)."""
  cfg: SanaConfig
  grid: tuple[int, int]
  dtype: Dtype = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, x_BLD, ctx_BSD, ctx_mask, mod_BD):
    c, d = self.cfg, x_BLD.shape[-1]
    table = self.param("scale_shift_table", layers.logical(nn.initializers.normal(d ** -0.5), (None, "embed")),
                       (6, d), jnp.float32)
    mod = table[None].astype(self.dtype) + mod_BD.reshape(-1, 6, d).astype(self.dtype)
    sh_sa, sc_sa, g_sa, sh_mlp, sc_mlp, g_mlp = (mod[:, k] for k in range(6))
    h = layers.modulate(layers.layer_norm(self.dtype, name="norm1")(x_BLD), sh_sa, sc_sa)
    heads, hd = c.num_attention_heads, c.attention_head_dim
    proj = lambda name: layers.HeadsDense((d, heads, hd), "...d,dhk->...hk", ("embed", "heads", "kv"),
                                          c.attention_bias, self.dtype, name=name)(h)
    att = layers.relu_linear_attention(proj("query"), proj("key"), proj("value")).astype(self.dtype)
    att = layers.HeadsDense((heads, hd, d), "...hk,hkd->...d", ("heads", "kv", "embed"), True, self.dtype,
                            name="out")(att)
    x_BLD = x_BLD + g_sa[:, None, :] * att
    x_BLD = x_BLD + layers.Attention(c.num_cross_attention_heads, head_dim=c.cross_attention_head_dim, use_bias=True,
                                     dtype=self.dtype, implementation=self.attention,
                                     name="cross_attn")(x_BLD, ctx_BSD, mask=ctx_mask)
    h = layers.modulate(layers.layer_norm(self.dtype, name="norm2")(x_BLD), sh_mlp, sc_mlp)
    b, (gh, gw) = x_BLD.shape[0], self.grid
    ff = dc_ae.GLUMBConv(c.mlp_ratio, norm_and_residual=False, dtype=self.dtype, name="ff")(h.reshape(b, gh, gw, d))
    x_BLD = x_BLD + g_mlp[:, None, :] * ff.reshape(b, gh * gw, d)
    return layers.constrain(x_BLD, ("batch", "length", "embed")), None


class SanaTransformer(nn.Module):
  cfg: SanaConfig
  dtype: Dtype = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  def setup(self):
    w = self.cfg.width
    self.t_embedder = layers.TimestepEmbedder(w, dtype=self.dtype, scale=1.0)
    self.shared_modulation = layers.Dense(6 * w, ("embed", "mlp"), zero_init=True, dtype=self.dtype)
    self.caption_fc1 = layers.Dense(w, ("mlp", "embed"), dtype=self.dtype)
    self.caption_fc2 = layers.Dense(w, ("mlp", "embed"), dtype=self.dtype)
    self.caption_norm = layers.RMSNorm(1e-5, dtype=self.dtype)

  def time(self, timesteps_B):
    return self.t_embedder(timesteps_B)

  @nn.compact
  def __call__(self, x_BHWC, t_emb_BD, ctx_BSC, ctx_valid_BS):
    c, w = self.cfg, self.cfg.width
    b, hh, ww, ch = x_BHWC.shape
    p = c.patch_size
    gh, gw = hh // p, ww // p
    x = layers.Dense(w, ("patch", "embed"), dtype=self.dtype, name="patch_embed")(
        layers.patchify(x_BHWC, p).astype(self.dtype))
    x = x.reshape(b, gh * gw, w)
    if c.interpolation_scale:
      base = c.sample_size // p
      x = x + layers.sincos_2d(gh, gw, w, base / gh / c.interpolation_scale, base / gw / c.interpolation_scale,
                               x_first=True).astype(self.dtype)[None]
    ctx = self.caption_norm(self.caption_fc2(nn.gelu(self.caption_fc1(ctx_BSC.astype(self.dtype)), approximate=True)))
    mod = self.shared_modulation(nn.silu(t_emb_BD.astype(self.dtype)))
    block = SanaBlock
    if self.remat != "none":
      block = nn.remat(SanaBlock, policy=layers.REMAT_POLICIES[self.remat], prevent_cse=False)
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    impl = None if self.attention == "xla" else self.attention
    x, _ = blocks(c, (gh, gw), self.dtype, impl, name="blocks")(x, ctx, layers.attention_mask(None, ctx_valid_BS), mod)
    table = self.param("final_scale_shift_table", layers.logical(nn.initializers.normal(w ** -0.5), (None, "embed")),
                       (2, w), jnp.float32)
    shift, scale = table[0][None] + t_emb_BD, table[1][None] + t_emb_BD
    x = layers.modulate(layers.layer_norm(self.dtype, name="final_norm")(x), shift, scale)
    x = layers.Dense(p * p * c.out_channels, ("embed", "patch"), zero_init=True, dtype=self.dtype, name="final_proj")(x)
    return layers.unpatchify(x, (gh, gw), p).astype(jnp.float32)


def forward(module: SanaTransformer, x_BHWC, timesteps_B, ctx_BSC, ctx_valid_BS):
  """Both methods in one call (`module.apply(..., method=forward)`: init, conversion, parity)."""
  return module(x_BHWC, module.time(timesteps_B), ctx_BSC, ctx_valid_BS)


def abstract_inputs(cfg: SanaConfig, batch: int = 1, text_length: int = 4) -> tuple:
  sds, s = jax.ShapeDtypeStruct, 2 * cfg.patch_size
  return (sds((batch, s, s, cfg.in_channels), jnp.float32), sds((batch,), jnp.float32),
          sds((batch, text_length, cfg.caption_channels), jnp.float32), sds((batch, text_length), jnp.bool_))
