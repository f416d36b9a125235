"""LI-DiT: per-LLM token refiners -> collaborative refiner (or plain concatenation) -> instruction tokens
masked out -> DiT with cross-attention to the text. The denoiser family `lidit` (see `denoisers/__init__`).

The frozen towers live outside it: they run once per prompt, their parameters stay out of the optimizer. The
refiners are conditioned on the timestep, so they run inside the denoiser at every step.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.models import dit as dit_lib
from lidit_jax.models import layers, refiner

Dtype = Any


class LIDiT(nn.Module):
  dit: dit_lib.DiTConfig
  refiner_depth: int = 2
  refiner_heads: int = 8
  refiner_mlp_ratio: float = 4.0
  refiner_causal: bool = False
  refiner_gated: bool = True
  refiner_rope: bool = False  # rotary word positions in the token refiners' self-attention
  fusion: str = "collaborative"  # or "concat"
  drop_instruction: bool = True
  dtype: Dtype = jnp.float32

  def encode_text(self, feats: Sequence[jax.Array], valids: Sequence[jax.Array], prompts: Sequence[jax.Array],
                  t_emb_BD: jax.Array):
    """Refine each LLM's features; returns context [B, S, D] and its validity mask [B, S]."""
    w = self.dit.width
    xs, cs, vs = [], [], []
    for i, (f, v, pm) in enumerate(zip(feats, valids, prompts)):
      x, c = refiner.TokenRefiner(w, self.refiner_depth, self.refiner_heads, self.refiner_mlp_ratio,
                                  causal=self.refiner_causal,
                                  gated=self.refiner_gated, qk_norm=self.dit.qk_norm,
                                  rope_theta=10000.0 if self.refiner_rope else None, dtype=self.dtype,
                                  name=f"token_refiner_{i}")(f, v, pm, t_emb_BD)
      xs.append(x), cs.append(c), vs.append(v.astype(bool))
    if self.fusion == "collaborative":
      xs = refiner.CollaborativeRefiner(self.refiner_heads, self.refiner_mlp_ratio, qk_norm=self.dit.qk_norm,
                                        dtype=self.dtype,
                                        name="collaborative_refiner")(xs, vs, cs)
    # Static shapes under jit: instruction tokens are masked, never sliced away.
    keep = [v & pm.astype(bool) if self.drop_instruction else v for v, pm in zip(vs, prompts)]
    return jnp.concatenate(xs, axis=1), jnp.concatenate(keep, axis=1)

  @nn.compact
  def __call__(self, x_BHWC, t_B, feats, valids, prompts, drop_B=None):
    """Velocity prediction. `drop_B` (bool) replaces an example's text by the learned null context (CFG)."""
    t_emb = layers.TimestepEmbedder(self.dit.width, dtype=self.dtype, name="t_embedder")(t_B)
    ctx, ctx_valid = self.encode_text(feats, valids, prompts, t_emb)
    if drop_B is not None:
      null = self.param("null_context", layers.logical(nn.initializers.normal(0.02), ("length", "embed")),
                        ctx.shape[1:], jnp.float32).astype(ctx.dtype)
      d = drop_B[:, None]
      ctx = jnp.where(d[..., None], null[None], ctx)
      ctx_valid = jnp.where(d, True, ctx_valid)
    pooled = layers.masked_mean(ctx, ctx_valid)
    return dit_lib.DiT(self.dit, self.dtype, name="denoiser")(x_BHWC, t_emb, pooled, ctx, ctx_valid)


def build(config, attention: str) -> LIDiT:
  m, r = config.model, config.model.refiner
  dcfg = dit_lib.DiTConfig(width=m.width, depth=m.depth, num_heads=m.num_heads, patch_size=m.patch_size,
                           in_channels=config.autoencoder.channels, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
                           pos_embed=m.pos_embed, remat=m.remat, scan=m.scan, modulation=m.modulation,
                           attention=attention)
  return LIDiT(dcfg, refiner_depth=r.depth, refiner_heads=r.num_heads, refiner_mlp_ratio=r.mlp_ratio,
               refiner_causal=r.causal, refiner_gated=r.gated, refiner_rope=r.rope, fusion=r.fusion,
               drop_instruction=config.text.drop_instruction, dtype=jnp.dtype(m.dtype))


def abstract_inputs(batch: int, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, int]]) -> dict:
  """One call's inputs as ShapeDtypeStructs; `text_shapes`: (length, width) of each tower's features."""
  sds, b = jax.ShapeDtypeStruct, batch
  return dict(
      x_BHWC=sds((b, *latent_hwc), jnp.float32), t_B=sds((b,), jnp.float32),
      feats=[sds((b, l, d), jnp.float32) for l, d in text_shapes],
      valids=[sds((b, l), jnp.bool_) for l, _ in text_shapes],
      prompts=[sds((b, l), jnp.bool_) for l, _ in text_shapes], drop_B=sds((b,), jnp.bool_))


def flops_per_example(config, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, int]]) -> dict:
  """Forward FLOPs of one example: 2 x (matmul weights x tokens they see) + attention (QK^T and PV)."""
  m, r = config.model, config.model.refiner
  h, w, _ = latent_hwc
  t = (h // m.patch_size) * (w // m.patch_size)  # image tokens
  lens = [l for l, _ in text_shapes]
  s = sum(lens)  # text tokens after concatenation
  d, f = m.width, int(m.width * m.mlp_ratio)
  per_block = (2 * t * (4 * d * d + 2 * d * f)  # self-attn q,k,v,o + MLP on image tokens
               + 2 * t * 2 * d * d + 2 * s * 2 * d * d  # cross-attn q,o on image tokens; k,v on text tokens
               + 4 * t * t * d + 4 * t * s * d)  # attention scores and weighted sums
  fr = int(d * r.mlp_ratio)
  refiners = sum(r.depth * (2 * l * (4 * d * d + 2 * d * fr) + 4 * l * l * d) + 2 * l * dim * d
                 for l, dim in text_shapes)
  if r.fusion == "collaborative" and len(lens) > 1:
    refiners += 2 * s * (4 * d * d + 2 * d * fr) + 4 * s * s * d
  return {"dit": m.depth * per_block, "refiners": refiners}


def param_groups(params) -> dict:
  """{report group: params}: the DiT apart from the refiners and embeddings around it."""
  rest = {k: v for k, v in params.items() if k != "denoiser"}
  return {"denoiser (DiT)": params["denoiser"], "refiners + embeddings": rest}


def validate(config, num_towers: int) -> None:
  """LI-DiT's own config checks (the DiT's shape, the refiners), each a ConfigError naming value and fix."""
  from lidit_jax.configs import fail, one_of
  m = config.model
  if m.depth < 1:
    fail("model.depth", m.depth, "must be at least 1", "set a positive value")
  if m.width % m.num_heads:
    fail("model.width", m.width, f"not divisible by model.num_heads={m.num_heads}",
         f"use a width that is a multiple of {m.num_heads}, e.g. {m.num_heads * max(1, round(m.width / m.num_heads))}")
  if m.width % m.refiner.num_heads:
    fail("model.refiner.num_heads", m.refiner.num_heads, f"does not divide model.width={m.width}",
         "pick a divisor of the width")
  if m.refiner.depth < 0:
    fail("model.refiner.depth", m.refiner.depth, "must be >= 0", "use 0 to disable the token refiner")
  one_of("model.pos_embed", m.pos_embed, {"resblock", "sincos", "both"})
  one_of("model.modulation", m.modulation, {"block", "single"})
  if m.pos_embed in ("sincos", "both") and m.width % 4:
    fail("model.width", m.width, "sin-cos positions need a width divisible by 4", "round the width to a multiple of 4")
  one_of("model.refiner.fusion", m.refiner.fusion, {"collaborative", "concat"})
  if m.refiner.fusion == "collaborative" and num_towers < 2:
    fail("model.refiner.fusion", "collaborative", f"needs two or more LLM towers, text.use has {num_towers}",
         "set --config.model.refiner.fusion=concat, or name a second tower in text.use")
