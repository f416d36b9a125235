"""Plain tokens (`conditioner.kind=tokens`): each tower's features projected to the context width and
concatenated, as PixArt reads T5 and SD reads CLIP; no refinement, no timestep. The baseline the refiners,
LLM4GEN's CAM and the Diff Adapter are measured against. A tower giving every layer
(`text.towers.NAME.all_layers`) is read as a learned softmax-weighted sum of its hidden states (ELMo's scalar
mix, uniform at init) before the projection."""
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
    xs = []
    for i, f in enumerate(feats):
      f = f.astype(self.dtype)
      if f.ndim == 4:  # [B, L, layers, D]: every hidden state of the tower
        w = self.param(f"layer_mix_{i}", layers.logical(nn.initializers.zeros, ("depth",)), (f.shape[2],),
                       jnp.float32)
        f = jnp.einsum("blnd,n->bld", f, jax.nn.softmax(w).astype(self.dtype))
      xs.append(layers.Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name=f"proj_{i}")(f))
    return jnp.concatenate(xs, axis=1), context_valid(valids, prompts, self.drop_instruction)


def build(section, text, width: int, dtype) -> Tokens:  # no section of its own
  return Tokens(width, text.drop_instruction, dtype)


def flops_per_example(section, text, text_shapes: Sequence[tuple[int, int]], width: int) -> int:
  """The projections, and the layer mixes of towers giving every layer (shape (L, layers, D))."""
  return sum(2 * shape[0] * shape[-1] * width + (2 * shape[0] * shape[1] * shape[-1] if len(shape) == 3 else 0)
             for shape in text_shapes)


def validate(section, text, geometry) -> None:
  """Nothing of its own: any tower width projects to any context width."""
