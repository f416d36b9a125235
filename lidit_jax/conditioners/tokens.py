"""Plain tokens (`conditioner.kind=tokens`): each tower's features projected to the context width and
concatenated, as PixArt reads T5 and SD reads CLIP; no refinement, no timestep. The baseline the refiners,
LLM4GEN's CAM and the Diff Adapter are measured against."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.conditioners import context_valid
from lidit_jax.models import layers

Dtype = Any


class Tokens(nn.Module):
  width: int
  drop_instruction: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], valids: Sequence[jax.Array], prompts: Sequence[jax.Array],
               t_emb_BD: jax.Array | None = None):
    xs = [layers.Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name=f"proj_{i}")(f.astype(self.dtype))
          for i, f in enumerate(feats)]
    return jnp.concatenate(xs, axis=1), context_valid(valids, prompts, self.drop_instruction)


def build(config, width: int) -> Tokens:
  return Tokens(width, config.text.drop_instruction, jnp.dtype(config.model.dtype))


def flops_per_example(config, text_shapes: Sequence[tuple[int, int]], width: int) -> int:
  return sum(2 * l * dim * width for l, dim in text_shapes)


def validate(config, num_towers: int) -> None:
  """Nothing of its own: any tower width projects to any context width."""
