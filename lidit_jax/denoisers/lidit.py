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

from lidit_jax import conditioners, denoisers
from lidit_jax.config_checks import fail, one_of
from lidit_jax.models import dit as dit_lib
from lidit_jax.models import layers

Dtype = Any

# Its fields in the shared `model` section (configs.base_config adds them).
# LoRA by default: the blocks' attention projections (`lora.targets`)
LORA_TARGETS = (r"^denoiser/blocks/.*/(self_attn|cross_attn)/(query|key|value|out)/kernel$",)
CONFIG_DEFAULTS = {"model": dict(
    width=128, depth=4, num_heads=4, patch_size=2, mlp_ratio=4.0, qk_norm=True, pos_embed="resblock", scan=True,
    modulation="block")}  # adaLN-Zero per block (LI-DiT), or "single" (PixArt-alpha's adaLN-single)


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


def build(m, shared, conditioner: nn.Module, attention: str) -> LIDiT:
  dcfg = dit_lib.DiTConfig(width=m.width, depth=m.depth, num_heads=m.num_heads, patch_size=m.patch_size,
                           in_channels=shared.latent_hwc[2], mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
                           pos_embed=m.pos_embed, remat=m.remat, scan=m.scan, modulation=m.modulation,
                           attention=attention)
  return LIDiT(dcfg, conditioner, dtype=jnp.dtype(shared.dtype), null=shared.null)


def image_tokens(latent_hwc: tuple[int, int, int], patch_size: int) -> int:
  return (latent_hwc[0] // patch_size) * (latent_hwc[1] // patch_size)


def patch_geometry(latent_hwc: tuple[int, int, int], patch_size: int, context_width: int):
  """A patch transformer's Geometry (this family's and the diffusers transformer families')."""
  return denoisers.Geometry(latent_hwc, patch_size, image_tokens(latent_hwc, patch_size), context_width)


def geometry(m, latent_hwc: tuple[int, int, int]):
  return patch_geometry(latent_hwc, m.patch_size, m.width)


def abstract_inputs(batch: int, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]]) -> dict:
  """One call's inputs as ShapeDtypeStructs; `text_shapes`: each tower's feature shape, (length, ..., width)."""
  sds, b = jax.ShapeDtypeStruct, batch
  return dict(
      x_BHWC=sds((b, *latent_hwc), jnp.float32), t_B=sds((b,), jnp.float32),
      feats=[sds((b, *shape), jnp.float32) for shape in text_shapes],
      valids=[sds((b, shape[0]), jnp.bool_) for shape in text_shapes],
      prompts=[sds((b, shape[0]), jnp.bool_) for shape in text_shapes], drop_B=sds((b,), jnp.bool_))


def flops_per_example(m, shared, text_shapes: Sequence[tuple[int, ...]], conditioner=None, conditioner_flops=0) -> dict:
  """Forward FLOPs of one example in the DiT: 2 x (matmul weights x tokens they see) + attention (QK^T and PV)."""
  t = image_tokens(shared.latent_hwc, m.patch_size)
  s = sum(shape[0] for shape in text_shapes)  # text tokens after concatenation
  d, f = m.width, int(m.width * m.mlp_ratio)
  per_block = (2 * t * (4 * d * d + 2 * d * f)  # self-attn q,k,v,o + MLP on image tokens
               + 2 * t * 2 * d * d + 2 * s * 2 * d * d  # cross-attn q,o on image tokens; k,v on text tokens
               + 4 * t * t * d + 4 * t * s * d)  # attention scores and weighted sums
  return {"dit": m.depth * per_block}


# Per block and image token, in float32 vectors of the width, what the train step keeps for the backward pass under
# each remat policy besides XLA attention's scores (`scores_bytes`) and the cross-attention's keys and values of the
# text tokens (bf16, all but "full"). Calibrated against the TPU compiler's memory analysis of LI-DiT-1B (bf16, 256
# image + 512 text tokens, splash attention; benchmarks/RESULTS.md, 2026-12-05): layer norms, softmax and the
# residual stream are float32, so far more than the bf16 matmul outputs alone. `WORKING_BLOCKS`: the working set of
# the block being differentiated (and recomputed), in blocks kept unrematerialised.
KEPT_PER_TOKEN = {"none": 48.0, "dots": 10.0, "dots_no_batch": 10.0, "full": 1.0}
WORKING_BLOCKS = 2.0
# Bytes per head, query and key that XLA's attention keeps for the backward pass without remat, without and with a
# key-padding mask: the float32 probabilities (PixArt-Sigma's self-attention beside LI-DiT's per-token figures), and
# with a mask the float32 logits and 16-bit probabilities too (Lumina 2's joint attention, XLA against splash); both
# the TPU compiler's, benchmarks/RESULTS.md, 2026-12-07. Under "dots": the scores dot's float32 output. Splash (each
# call its 128-token blocks tile) and cuDNN's fused kernel keep none: they recompute them.
SCORE_BYTES = {"none": (4.0, 10.5), "dots": (4.0, 4.0)}


def scores_bytes(heads: float, queries: int, keys: int, attention: str, remat: str, masked: bool) -> float:
  """Bytes one example's attention call (`attention`: the resolved kernel) keeps per layer for its scores."""
  fused = attention == "cudnn" or (attention == "splash" and not (queries % 128 or keys % 128))
  return 0.0 if fused or remat not in SCORE_BYTES else SCORE_BYTES[remat][masked] * heads * queries * keys


def activation_bytes(m, shared, batch: int, text_shapes: Sequence[tuple[int, ...]], tensor: int, itemsize: int,
                     attention: str, kept_per_token: dict = KEPT_PER_TOKEN, working_blocks: float = WORKING_BLOCKS,
                     self_attention: str = "softmax") -> int:
  """Bytes of the train step's temporaries for `batch` examples on one device, besides the gradients: what the
  scanned DiT blocks keep for the backward pass (`kept_per_token` at model.remat, the self- and cross-attention's
  scores by kernel), the working set of one block recomputed and differentiated; the conditioner's are its own.
  Tensor parallelism (`tensor` devices) splits the width and the heads. `itemsize` is unused: the calibrated
  figures carry their dtypes. `self_attention`: "softmax" over the image tokens, "masked" (a padded joint sequence:
  Lumina 2's), or "linear" (Sana's: no token x token scores); the cross-attention's keys are padded text."""
  del itemsize
  t = image_tokens(shared.latent_hwc, m.patch_size)
  s = sum(shape[0] for shape in text_shapes)
  d, heads = m.width / tensor, m.num_heads / tensor
  text_kv = 2 * 2 * s * d  # bf16 keys and values of the text tokens

  def kept(policy):
    scores = (scores_bytes(heads, t, t, attention, policy, self_attention == "masked")
              if self_attention != "linear" else 0) + scores_bytes(heads, t, s, attention, policy, True)
    return 4 * kept_per_token[policy] * t * d + scores + (text_kv if policy != "full" else 0)

  return int(batch * (m.depth * kept(shared.remat) + working_blocks * kept("none")))


def param_groups(params) -> dict:
  """{report group: params}: the DiT, the conditioner, the embeddings around them."""
  rest = {k: v for k, v in params.items() if k not in ("denoiser", "conditioner")}
  return {"denoiser (DiT)": params["denoiser"], "conditioner": params["conditioner"], "embeddings": rest}


def validate(m, latent_hwc: tuple[int, int, int]) -> None:
  """The DiT's own config checks, each a ConfigError naming value and fix (the image size against its patch:
  configs.validate, from the geometry)."""
  for key in ("depth", "patch_size"):
    if m[key] < 1:
      fail(f"model.{key}", m[key], "must be at least 1", "set a positive value")
  if m.width % m.num_heads:
    fail("model.width", m.width, f"not divisible by model.num_heads={m.num_heads}",
         f"use a width that is a multiple of {m.num_heads}, e.g. {m.num_heads * max(1, round(m.width / m.num_heads))}")
  one_of("model.pos_embed", m.pos_embed, {"resblock", "sincos", "both"})
  one_of("model.modulation", m.modulation, {"block", "single"})
  if m.pos_embed in ("sincos", "both") and m.width % 4:
    fail("model.width", m.width, "sin-cos positions need a width divisible by 4", "round the width to a multiple of 4")
