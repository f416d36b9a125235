"""LI-DiT's backbone: a DiT with cross-attention to the context of a conditioner (LI-DiT's refiners by default,
`conditioner.kind`). The denoiser family `lidit` (see `denoisers/__init__`).

The frozen towers live outside it: they run once per prompt, their parameters stay out of the optimizer. The
refiners are conditioned on the timestep, so the conditioner runs inside the denoiser at every step.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax import conditioners
from lidit_jax.config_checks import fail, one_of
from lidit_jax.models import dit as dit_lib
from lidit_jax.models import layers

Dtype = Any


class LIDiT(nn.Module):
  """The DiT reading a conditioner's context (LI-DiT: the refiners; `conditioner.kind`)."""
  dit: dit_lib.DiTConfig
  conditioner: nn.Module  # conditioners contract: (feats, valids, prompts, t_emb) -> (context, validity[, pooled])
  dtype: Dtype = jnp.float32
  null: str = "learned"  # conditioner.null: the unconditional context where drop_B

  @nn.compact
  def __call__(self, x_BHWC, t_B, feats, valids, prompts, drop_B=None):
    """Velocity prediction. `drop_B` (bool) replaces an example's text by the null context (CFG)."""
    t_emb = layers.TimestepEmbedder(self.dit.width, dtype=self.dtype, name="t_embedder")(t_B)
    ctx, ctx_valid = conditioners.outputs(self.conditioner(feats, valids, prompts, t_emb))[:2]  # a code: not read
    ctx, ctx_valid = conditioners.null_context(self, ctx, ctx_valid, drop_B, self.null)
    pooled = layers.masked_mean(ctx, ctx_valid)
    return dit_lib.DiT(self.dit, self.dtype, name="denoiser")(x_BHWC, t_emb, pooled, ctx, ctx_valid)


def build(config, attention: str) -> LIDiT:
  m = config.model
  dcfg = dit_lib.DiTConfig(width=m.width, depth=m.depth, num_heads=m.num_heads, patch_size=m.patch_size,
                           in_channels=config.autoencoder.channels, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
                           pos_embed=m.pos_embed, remat=m.remat, scan=m.scan, modulation=m.modulation,
                           attention=attention)
  return LIDiT(dcfg, conditioners.conditioner(config).build(config, m.width), dtype=jnp.dtype(m.dtype),
               null=config.conditioner.null)


def abstract_inputs(batch: int, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]]) -> dict:
  """One call's inputs as ShapeDtypeStructs; `text_shapes`: each tower's feature shape, (length, ..., width)."""
  sds, b = jax.ShapeDtypeStruct, batch
  return dict(
      x_BHWC=sds((b, *latent_hwc), jnp.float32), t_B=sds((b,), jnp.float32),
      feats=[sds((b, *shape), jnp.float32) for shape in text_shapes],
      valids=[sds((b, shape[0]), jnp.bool_) for shape in text_shapes],
      prompts=[sds((b, shape[0]), jnp.bool_) for shape in text_shapes], drop_B=sds((b,), jnp.bool_))


def flops_per_example(config, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]]) -> dict:
  """Forward FLOPs of one example: 2 x (matmul weights x tokens they see) + attention (QK^T and PV)."""
  m = config.model
  h, w, _ = latent_hwc
  t = (h // m.patch_size) * (w // m.patch_size)  # image tokens
  s = sum(shape[0] for shape in text_shapes)  # text tokens after concatenation
  d, f = m.width, int(m.width * m.mlp_ratio)
  per_block = (2 * t * (4 * d * d + 2 * d * f)  # self-attn q,k,v,o + MLP on image tokens
               + 2 * t * 2 * d * d + 2 * s * 2 * d * d  # cross-attn q,o on image tokens; k,v on text tokens
               + 4 * t * t * d + 4 * t * s * d)  # attention scores and weighted sums
  return {"dit": m.depth * per_block,
          "conditioner": conditioners.conditioner(config).flops_per_example(config, text_shapes, d)}


def activation_bytes(config, batch: int, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]],
                     tensor: int, itemsize: int) -> int:
  """Rough bytes the DiT blocks (the bulk) keep for the backward pass of `batch` examples on one device.

  Per block and image token: remat "full" keeps the block input (1 x D); "dots_no_batch" the outputs of
  weight matmuls (about (6 + 2 mlp_ratio) x D); "dots" those plus attention scores; "none" everything
  (about (14 + 2 mlp_ratio) x D plus scores). Tensor parallelism (`tensor` devices) splits D and the heads.
  """
  m = config.model
  h, w, _ = latent_hwc
  t = (h // m.patch_size) * (w // m.patch_size)
  s = sum(shape[0] for shape in text_shapes)
  d = m.width / tensor
  scores = m.num_heads / tensor * t * (t + s)  # per example: self + cross attention probabilities
  per_token = {"full": 1.0, "dots_no_batch": 6 + 2 * m.mlp_ratio, "dots": 6 + 2 * m.mlp_ratio,
               "none": 14 + 2 * m.mlp_ratio}[m.remat]
  keep_scores = m.remat in ("dots", "none")
  per_block = batch * (t * per_token * d + (scores if keep_scores else 0))
  return int(m.depth * per_block * itemsize)


def param_groups(params) -> dict:
  """{report group: params}: the DiT, the conditioner, the embeddings around them."""
  rest = {k: v for k, v in params.items() if k not in ("denoiser", "conditioner")}
  return {"denoiser (DiT)": params["denoiser"], "conditioner": params["conditioner"], "embeddings": rest}


def validate(config, towers: Sequence[str]) -> None:
  """The DiT's own config checks, each a ConfigError naming value and fix."""
  m = config.model
  if m.depth < 1:
    fail("model.depth", m.depth, "must be at least 1", "set a positive value")
  if m.width % m.num_heads:
    fail("model.width", m.width, f"not divisible by model.num_heads={m.num_heads}",
         f"use a width that is a multiple of {m.num_heads}, e.g. {m.num_heads * max(1, round(m.width / m.num_heads))}")
  one_of("model.pos_embed", m.pos_embed, {"resblock", "sincos", "both"})
  one_of("model.modulation", m.modulation, {"block", "single"})
  unit = m.patch_size * config.autoencoder.factor
  if config.data.image_size % unit:
    fail("data.image_size", config.data.image_size,
         f"not divisible by patch_size x autoencoder factor = {m.patch_size} x {config.autoencoder.factor} = {unit}",
         f"use an image size that is a multiple of {unit}, e.g. {unit * max(1, round(config.data.image_size / unit))}")
  if m.pos_embed in ("sincos", "both") and m.width % 4:
    fail("model.width", m.width, "sin-cos positions need a width divisible by 4", "round the width to a multiple of 4")
