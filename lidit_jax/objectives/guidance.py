"""Classifier-free guidance, shared by every objective: it mixes two predictions of the same network."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def guided(cond_and_uncond: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]], scale: float,
           renorm: bool = False, above: float | None = None):
  """pred = pred_uncond + scale (pred_cond - pred_uncond); scale 1 is the conditional model. Linear, so it
  gives the same sampler whether the network predicts a velocity, a clean image or noise. `renorm`
  (Lumina2Pipeline's cfg_normalization): the guided prediction rescaled to the conditional one's norm along each
  row of pixels (its torch dim -1 of NCHW: our axis 2 of NHWC), which keeps high guidance from over-saturating.
  `above`: guidance only where the time is above it, the conditional prediction elsewhere (Lumina2Pipeline's
  cfg_trunc_ratio: `truncation_time`)."""
  def net(x, t):
    p_c, p_u = cond_and_uncond(x, t)
    p = p_u + scale * (p_c - p_u)
    if renorm:
      p = p * jnp.linalg.norm(p_c, axis=2, keepdims=True) / jnp.linalg.norm(p, axis=2, keepdims=True)
    if above is not None:
      p = jnp.where((t > above).reshape((-1,) + (1,) * (p.ndim - 1)), p, p_c)
    return p
  return net


def truncation_time(step_times: np.ndarray, fraction: float) -> float | None:
  """The time that guides the steps i with (i + 1) / N <= fraction and no later one (N = len(step_times), the
  time each step's network call sees, descending): midway between the last guided step's and the next, so that
  rounding of the times inside a sampler moves no step across it. None: every step guided."""
  n = len(step_times)
  k = sum((i + 1) / n <= fraction for i in range(n))
  if k == n:
    return None
  return float(step_times[0]) + 1.0 if k == 0 else (float(step_times[k - 1]) + float(step_times[k])) / 2
