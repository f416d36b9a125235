"""Samplers several objectives share (no objective of its own): DPM-Solver++ 2M over any noise schedule given as
(alpha_t, sigma_t) at the sampling times, as diffusers' DPMSolverMultistepScheduler steps it for DDPM's
variance-preserving schedule (`objectives/ddpm.py`) and for flow matching's alpha = 1 - sigma
(`objectives/flow.py`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dpmpp_2m_tables(alpha: np.ndarray, sigma: np.ndarray) -> dict:
  """Per step (len(alpha) - 1 of them; the last point is the end, sigma 0): x' = x_coef x + m0 x0 + m1 x0_prev.
  First order at the first and the last step (lower_order_final), second order (midpoint) between."""
  alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
  k = len(alpha) - 1
  with np.errstate(divide="ignore", invalid="ignore"):  # the final sigma is 0: lambda = inf there
    lam = np.log(alpha) - np.log(sigma)
    h = lam[1:] - lam[:-1]
    b = -alpha[1:] * np.expm1(-h)  # first order: x' = (sigma' / sigma) x + b x0; b = alpha' at the final step
    r = np.ones(k)
    r[1:] = (lam[1:k] - lam[:k - 1]) / h[1:]  # r0 = h_prev / h
    second = np.zeros(k, bool)
    second[1:k - 1] = True
    m0 = np.where(second, b * (1 + 0.5 / r), b)  # midpoint: + b / 2 (x0 - x0_prev) / r0
    m1 = np.where(second, -b * 0.5 / r, 0.0)
    x_coef = sigma[1:] / sigma[:-1]
  return {"x_coef": x_coef, "m0": m0, "m1": m1}


def dpmpp_2m(x0_of, x, tab: dict, steps: int):
  """The solver's loop: `x0_of(i, x)` -> the clean sample the network implies at step i; `tab` from
  `dpmpp_2m_tables` (as jnp arrays)."""
  def body(i, carry):
    x, prev = carry
    x0 = x0_of(i, x)
    return tab["x_coef"][i] * x + tab["m0"][i] * x0 + tab["m1"][i] * prev, x0
  return jax.lax.fori_loop(0, steps, body, (x, jnp.zeros_like(x)))[0]
