"""diffusers' PixArtTransformer2DModel (PixArt-alpha / Sigma) in Linen: the timestep embedding (+ PixArt-alpha's
resolution and aspect-ratio micro-conditions), the caption projection (T5 width -> model width: Linear, tanh-GELU,
Linear) and our DiT with adaLN-single (`models/dit.py`, modulation="single", sin-cos positions in PixArt's layout,
learned sigma: twice the latent channels out).

Two methods, so that a conditioner conditioned on time (LI-DiT's refiners) can read the model's own timestep
embedding between them: `time(timesteps, size_hw)` (diffusers' timesteps, 0 .. 999) -> the embedded timestep,
then `__call__(x, t_emb, context, valid)` -> the prediction and the variance, [B, H, W, out_channels].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.models import dit as dit_lib
from lidit_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class PixArtConfig:
  """diffusers' PixArtTransformer2DModel fields (PixArt-Sigma-XL-2-1024-MS's values by default)."""
  num_attention_heads: int = 16
  attention_head_dim: int = 72
  in_channels: int = 4
  out_channels: int = 8  # twice in_channels: the learned sigma
  num_layers: int = 28
  caption_channels: int = 4096  # 0: no caption projection (the context is already the model's width)
  sample_size: int = 128  # latent side the positions were trained at
  patch_size: int = 2
  interpolation_scale: float = 2.0
  use_additional_conditions: bool = False  # PixArt-alpha 1024's resolution / aspect-ratio embeddings

  @property
  def width(self) -> int:
    return self.num_attention_heads * self.attention_head_dim


class PixArtTransformer(nn.Module):
  cfg: PixArtConfig
  dtype: Dtype = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  def setup(self):
    c, w = self.cfg, self.cfg.width
    self.t_embedder = layers.TimestepEmbedder(w, dtype=self.dtype, scale=1.0)
    if c.use_additional_conditions:  # each a third of the width: (height, width) and the aspect ratio
      self.resolution_embedder = layers.TimestepEmbedder(w // 3, dtype=self.dtype, scale=1.0)
      self.aspect_ratio_embedder = layers.TimestepEmbedder(w // 3, dtype=self.dtype, scale=1.0)
    if c.caption_channels:
      self.caption_fc1 = layers.Dense(w, ("mlp", "embed"), dtype=self.dtype)
      self.caption_fc2 = layers.Dense(w, ("mlp", "embed"), dtype=self.dtype)
    self.dit = dit_lib.DiT(dit_lib.DiTConfig(
        width=w, depth=c.num_layers, num_heads=c.num_attention_heads, patch_size=c.patch_size,
        in_channels=c.in_channels, qk_norm=False, pos_embed="sincos", remat=self.remat, attention=self.attention,
        modulation="single", out_channels=c.out_channels, pos_base=c.sample_size // c.patch_size,
        pos_interpolation=c.interpolation_scale), self.dtype)

  def time(self, timesteps_B, size_hw=None):
    """The embedded timestep [B, width]; with micro-conditions, plus those of the image's (height, width) in pixels
    and their ratio (as PixArtAlphaPipeline passes them)."""
    emb = self.t_embedder(timesteps_B)
    if self.cfg.use_additional_conditions:
      b = timesteps_B.shape[0]
      h, w = size_hw
      sizes = jnp.tile(jnp.asarray([h, w], jnp.float32), b)
      ratio = jnp.full((b,), h / w, jnp.float32)
      emb = emb + jnp.concatenate([self.resolution_embedder(sizes).reshape(b, -1),
                                   self.aspect_ratio_embedder(ratio)], axis=-1)
    return emb

  def __call__(self, x_BHWC, t_emb_BD, ctx_BSC, ctx_valid_BS):
    ctx = ctx_BSC.astype(self.dtype)
    if self.cfg.caption_channels:
      ctx = self.caption_fc2(nn.gelu(self.caption_fc1(ctx), approximate=True))
    return self.dit(x_BHWC, t_emb_BD, None, ctx, ctx_valid_BS)


def forward(module: PixArtTransformer, x_BHWC, timesteps_B, ctx_BSC, ctx_valid_BS, size_hw=None):
  """Both methods in one call (`module.apply(..., method=forward)`: init, conversion, parity)."""
  return module(x_BHWC, module.time(timesteps_B, size_hw), ctx_BSC, ctx_valid_BS)


def abstract_inputs(cfg: PixArtConfig, batch: int = 1, text_length: int = 4) -> tuple:
  sds, s = jax.ShapeDtypeStruct, 2 * cfg.patch_size
  return (sds((batch, s, s, cfg.in_channels), jnp.float32), sds((batch,), jnp.float32),
          sds((batch, text_length, cfg.caption_channels or cfg.width), jnp.float32),
          sds((batch, text_length), jnp.bool_))
