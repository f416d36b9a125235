"""Classifier-free guidance, shared by every objective: it mixes two predictions of the same network."""
from __future__ import annotations

from typing import Callable

import jax


def guided(cond_and_uncond: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]], scale: float):
  """pred = pred_uncond + scale (pred_cond - pred_uncond); scale 1 is the conditional model. Linear, so it
  gives the same sampler whether the network predicts a velocity, a clean image or noise."""
  def net(x, t):
    p_c, p_u = cond_and_uncond(x, t)
    return p_u + scale * (p_c - p_u)
  return net
