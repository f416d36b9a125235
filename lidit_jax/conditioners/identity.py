"""The towers' features as the context (`conditioner.kind=identity`): Stable Diffusion's CLIP side, with no
parameters. Several towers are read side by side along the width (SDXL's two encoders: 768 + 1280 = 2048), so
their lengths must agree and their widths must sum to the backbone's context width. Towers with
`output="pooled"` are not context: their vectors, side by side, are the pooled vector [B, P] (SDXL's
text_embeds), the third thing returned."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.config_checks import fail, used_towers

Dtype = Any


class Identity(nn.Module):
  width: int
  pooled: tuple[bool, ...] = ()  # per tower: a pooled output (not context)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], valids: Sequence[jax.Array], prompts: Sequence[jax.Array],
               t_emb_BD: jax.Array | None = None):
    is_pooled = self.pooled or (False,) * len(feats)
    vectors = [f[:, 0].astype(self.dtype) for f, p in zip(feats, is_pooled) if p]
    feats = [f for f, p in zip(feats, is_pooled) if not p]
    valids = [v for v, p in zip(valids, is_pooled) if not p]
    shapes = [tuple(f.shape) for f in feats]
    if any(f.ndim != 3 for f in feats) or len({s[1] for s in shapes}) != 1 or sum(s[2] for s in shapes) != self.width:
      raise ValueError(f"conditioner.kind='identity' reads the towers' features [B, L, D] side by side as the "
                       f"context of width {self.width}, but they are {shapes}. Fix: towers of one length "
                       "(text.towers.*.max_length) whose widths sum to the context width (unet.cross_attention_dim), "
                       "one layer each (all_layers=False)")
    valid = valids[0].astype(bool)
    for v in valids[1:]:
      valid = valid & v.astype(bool)
    context = jnp.concatenate([f.astype(self.dtype) for f in feats], axis=-1)
    return context, valid, (jnp.concatenate(vectors, axis=-1) if vectors else None)


def build(section, text, width: int, dtype) -> Identity:  # no section of its own
  pooled = tuple(text.towers[n].output == "pooled" for n in used_towers(text))
  return Identity(width, pooled, dtype)


def flops_per_example(section, text, text_shapes: Sequence[tuple[int, int]], width: int) -> int:
  return 0


def validate(section, text, geometry) -> None:
  """The lengths must agree (the widths are known once the towers are read: checked at the first call)."""
  lengths = {text.towers[n].max_length for n in used_towers(text) if text.towers[n].output != "pooled"}
  if len(lengths) > 1:
    fail("text.towers.*.max_length", sorted(lengths), "conditioner.kind='identity' sets the towers side by side",
         "give every tower the same max_length (SD: 77)")
