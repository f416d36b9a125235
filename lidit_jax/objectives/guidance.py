"""Classifier-free guidance, shared by every objective: it mixes two predictions of the same network."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def guided(cond_and_uncond: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]], scale: float,
           renorm: bool = False):
  """pred = pred_uncond + scale (pred_cond - pred_uncond); scale 1 is the conditional model. Linear, so it
  gives the same sampler whether the network predicts a velocity, a clean image or noise. `renorm`
  (Lumina2Pipeline's cfg_normalization): the guided prediction rescaled to the conditional one's norm along each
  row of pixels (its torch dim -1 of NCHW: our axis 2 of NHWC), which keeps high guidance from over-saturating."""
  def net(x, t):
    p_c, p_u = cond_and_uncond(x, t)
    p = p_u + scale * (p_c - p_u)
    if renorm:
      p = p * jnp.linalg.norm(p_c, axis=2, keepdims=True) / jnp.linalg.norm(p, axis=2, keepdims=True)
    return p
  return net
