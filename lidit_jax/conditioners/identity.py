"""The towers' features as the context (`conditioner.kind=identity`): Stable Diffusion's CLIP side, with no
parameters. Several towers are read side by side along the width (SDXL's two encoders: 768 + 1280 = 2048), so
their lengths must agree and their widths must sum to the backbone's context width."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class Identity(nn.Module):
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], valids: Sequence[jax.Array], prompts: Sequence[jax.Array],
               t_emb_BD: jax.Array | None = None):
    shapes = [tuple(f.shape) for f in feats]
    if any(f.ndim != 3 for f in feats) or len({s[1] for s in shapes}) != 1 or sum(s[2] for s in shapes) != self.width:
      raise ValueError(f"conditioner.kind='identity' reads the towers' features [B, L, D] side by side as the "
                       f"context of width {self.width}, but they are {shapes}. Fix: towers of one length "
                       "(text.towers.*.max_length) whose widths sum to the context width (unet.cross_attention_dim), "
                       "one layer each (all_layers=False)")
    valid = valids[0].astype(bool)
    for v in valids[1:]:
      valid = valid & v.astype(bool)
    return jnp.concatenate([f.astype(self.dtype) for f in feats], axis=-1), valid


def build(config, width: int) -> Identity:
  return Identity(width, jnp.dtype(config.model.dtype))


def flops_per_example(config, text_shapes: Sequence[tuple[int, int]], width: int) -> int:
  return 0


def validate(config, towers: Sequence[str]) -> None:
  """The lengths must agree (the widths are known once the towers are read: checked at the first call)."""
  from lidit_jax.config_checks import fail
  lengths = {config.text.towers[n].max_length for n in towers}
  if len(lengths) > 1:
    fail("text.towers.*.max_length", sorted(lengths), "conditioner.kind='identity' sets the towers side by side",
         "give every tower the same max_length (SD: 77)")
