"""LI-DiT's refiners (`conditioner.kind=refiners`, options in `model.refiner`): a linguistic token refiner per
LLM, conditioned on the timestep, then the collaborative refiner (or plain concatenation); the instruction's
tokens are masked out after both (`text.drop_instruction`)."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.conditioners import context_valid
from lidit_jax.config_checks import fail, one_of, used_towers
from lidit_jax.models import refiner

Dtype = Any

# rope: rotary word positions in the token refiners; feature_norm: the LLM features RMS-normalised (no weights)
# before the refiner reads them, so a tower's scale cannot swamp the timestep in c. Neither is in the paper.
# LoRA by default: the token and collaborative refiners' attention projections
LORA_TARGETS = (r"^conditioner/.*/(attn|cross_attn)/(query|key|value|out)/kernel$",)
CONFIG_DEFAULTS = {"model": {"refiner": dict(depth=2, num_heads=4, mlp_ratio=4.0, causal=False, gated=True,
                                             fusion="collaborative", rope=False, feature_norm=False, qk_norm=True)}}


class Refiners(nn.Module):
  width: int
  depth: int = 2
  num_heads: int = 8
  mlp_ratio: float = 4.0
  causal: bool = False
  gated: bool = True
  rope: bool = False  # rotary word positions in the token refiners' self-attention
  feature_norm: bool = False  # RMS-normalise the LLM features before the token refiners (not in the paper)
  qk_norm: bool = True
  fusion: str = "collaborative"  # or "concat"
  drop_instruction: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], valids: Sequence[jax.Array], prompts: Sequence[jax.Array],
               t_emb_BD: jax.Array):
    xs, cs = [], []
    for i, (f, v, pm) in enumerate(zip(feats, valids, prompts)):
      x, c = refiner.TokenRefiner(self.width, self.depth, self.num_heads, self.mlp_ratio, causal=self.causal,
                                  gated=self.gated, qk_norm=self.qk_norm,
                                  rope_theta=10000.0 if self.rope else None,
                                  feature_norm=self.feature_norm, dtype=self.dtype,
                                  name=f"token_refiner_{i}")(f, v, pm, t_emb_BD)
      xs.append(x), cs.append(c)
    if self.fusion == "collaborative":
      xs = refiner.CollaborativeRefiner(self.num_heads, self.mlp_ratio, qk_norm=self.qk_norm, dtype=self.dtype,
                                        name="collaborative_refiner")(xs, [v.astype(bool) for v in valids], cs)
    return jnp.concatenate(xs, axis=1), context_valid(valids, prompts, self.drop_instruction)


def migrate(saved: dict) -> None:
  """Until 2026-12-06 the refiners used the DiT's model.qk_norm: a run saved then keeps it."""
  model = saved.get("model", {})
  refiner = model.get("refiner")
  if isinstance(refiner, dict) and "qk_norm" not in refiner and "qk_norm" in model:
    refiner["qk_norm"] = model["qk_norm"]


def build(r, text, width: int, dtype) -> Refiners:
  return Refiners(width, r.depth, r.num_heads, r.mlp_ratio, r.causal, r.gated, r.rope,
                  feature_norm=r.feature_norm, qk_norm=r.qk_norm, fusion=r.fusion,
                  drop_instruction=text.drop_instruction, dtype=dtype)


def flops_per_example(r, text, text_shapes: Sequence[tuple[int, int]], width: int) -> int:
  """2 x (matmul weights x tokens they see) + attention scores and weighted sums."""
  d = width
  fr = int(d * r.mlp_ratio)
  out = sum(r.depth * (2 * l * (4 * d * d + 2 * d * fr) + 4 * l * l * d) + 2 * l * dim * d for l, dim in text_shapes)
  if r.fusion == "collaborative" and len(text_shapes) > 1:
    s = sum(l for l, _ in text_shapes)
    out += 2 * s * (4 * d * d + 2 * d * fr) + 4 * s * s * d
  return out


# Per text token and refiner layer (token refiners + the collaborative one), unrematerialised, in float32 vectors of
# the width: calibrated with the DiT's figures against the TPU compiler (LI-DiT-1B; benchmarks/RESULTS.md, 2026-12-05).
PER_TOKEN = 6.3


def activation_bytes(r, text, text_shapes: Sequence[tuple[int, int]], width: int, tensor: int) -> float:
  """Bytes one example keeps for the backward pass in the refiners, `tensor`-way tensor parallel."""
  layers = r.depth + (r.fusion == "collaborative" and len(text_shapes) > 1)
  return 4 * PER_TOKEN * layers * sum(shape[0] for shape in text_shapes) * width / tensor


def validate(r, text, geometry) -> None:
  towers = used_towers(text)
  for n in towers:
    if text.towers[n].all_layers:
      fail(f"text.towers.{n}.all_layers", True, "the refiners read one hidden state per tower",
           f"set --config.text.towers.{n}.all_layers=False and pick text.towers.{n}.layer, or use a conditioner "
           "that reads every layer (conditioner.kind=tokens)")
  if geometry.context_width % r.num_heads:
    fail("model.refiner.num_heads", r.num_heads, f"does not divide the denoiser's context width "
         f"{geometry.context_width}", "pick a divisor of the width")
  if r.depth < 0:
    fail("model.refiner.depth", r.depth, "must be >= 0", "use 0 to disable the token refiner")
  one_of("model.refiner.fusion", r.fusion, {"collaborative", "concat"})
  if r.fusion == "collaborative" and len(towers) < 2:
    fail("model.refiner.fusion", "collaborative", f"needs two or more LLM towers, text.use has {len(towers)}",
         "set --config.model.refiner.fusion=concat, or name a second tower in text.use")
