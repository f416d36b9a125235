"""Rectified flow: timestep densities, shifts, and the ODE samplers on a target with a closed-form answer."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lidit_jax.objectives import flow


def flow_cfg(kind):
  return ml_collections.ConfigDict(dict(timestep=kind, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                        shift=1.0, resolution_shift=False, unshifted=0.0,
                                        prediction="velocity", x0_t_min=0.05, loss="velocity"))


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "mode"])
def test_timesteps_in_unit_interval(kind):
  t = flow.sample_timesteps(jax.random.key(0), 20000, flow_cfg(kind))
  assert float(t.min()) > 0.0 and float(t.max()) < 1.0
  assert abs(float(jnp.median(t)) - 0.5) < 0.03  # all three densities are symmetric about 1/2 here
  if kind == "logit_normal":  # mass concentrated in the middle compared to uniform
    assert float(jnp.mean(jnp.abs(t - 0.5) < 0.25)) > 0.6


def test_shift_moves_time_towards_noise():
  t = jnp.linspace(0.01, 0.99, 50)
  assert bool(jnp.all(flow.shift_time(t, 3.0) > t))
  np.testing.assert_allclose(flow.shift_time(t, 1.0), t, atol=1e-7)
  np.testing.assert_allclose(flow.shift_time(jnp.array([0.0, 1.0]), 3.0), [0.0, 1.0], atol=1e-7)
  # Flux's rule: mu(256 tokens) = 0.5, mu(4096) = 1.15, and s' = e^mu / (e^mu + 1/s - 1) is the same map
  assert flow.resolution_shift(256) == pytest.approx(math.exp(0.5))
  assert flow.resolution_shift(4096) == pytest.approx(math.exp(1.15))
  mu, s = 0.8, 0.3
  assert float(flow.shift_time(s, math.exp(mu))) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / s - 1), rel=1e-6)


def test_unshifted_fraction_mixes_both_densities():
  cfg = flow_cfg("uniform")
  cfg.unshifted = 0.5
  t = flow.sample_timesteps(jax.random.key(0), 20000, cfg, shift=3.0)
  # P(t < 1/4): 1/4 unshifted, 1/10 shifted by 3 (t' < 1/4 <=> t < 1/10); half of each.
  assert float(jnp.mean(t < 0.25)) == pytest.approx(0.175, abs=0.01)
  shifted = flow.sample_timesteps(jax.random.key(0), 20000, flow_cfg("uniform"), shift=3.0)
  assert float(jnp.mean(shifted < 0.25)) == pytest.approx(0.1, abs=0.01)


def gaussian_velocity(mu, sigma):
  """Exact E[eps - x0 | x_t] for x0 ~ N(mu, sigma^2), eps ~ N(0, 1), x_t = (1 - t) x0 + t eps."""
  def v(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    a, b = 1.0 - t, t
    var = a * a * sigma ** 2 + b * b
    r = x - a * mu
    e_eps = b / var * r
    e_x0 = mu + a * sigma ** 2 / var * r
    return e_eps - e_x0
  return v


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 200, 2e-2), ("heun", 40, 2e-3)])
def test_sampler_transports_noise_to_the_gaussian(sampler, steps, tol):
  mu, sigma = 2.0, 0.5
  noise = jax.random.normal(jax.random.key(0), (256, 3))
  x0 = flow.solve(gaussian_velocity(mu, sigma), noise, steps, sampler)
  # The exact flow between two Gaussians is affine: x0 = mu + sigma * noise.
  np.testing.assert_allclose(x0, mu + sigma * noise, atol=tol)


def test_heun_beats_euler_at_equal_steps():
  mu, sigma = -1.0, 0.3
  noise = jax.random.normal(jax.random.key(1), (128, 2))
  exact = mu + sigma * noise
  err = {s: float(jnp.abs(flow.solve(gaussian_velocity(mu, sigma), noise, 10, s) - exact).max())
         for s in ("euler", "heun")}
  assert err["heun"] < err["euler"] / 5, err


def test_loss_is_zero_for_the_exact_velocity_of_a_point_mass():
  # For x0 = c (a point mass), the exact velocity is (x_t - c) / t, so the loss vanishes.
  c = jnp.full((4, 3), 0.7)
  v = lambda x, t: (x - c) / t.reshape(-1, 1)
  loss, t = flow.loss_terms(v, c, jax.random.key(2), flow_cfg("uniform"))
  assert float(loss.max()) < 1e-8
  wrong = lambda x, t: jnp.zeros_like(x)
  assert float(flow.loss_terms(wrong, c, jax.random.key(2), flow_cfg("uniform"))[0].mean()) > 0.1


def test_x0_prediction_gives_the_velocity_and_samples_land_on_the_prediction():
  cfg = flow_cfg("uniform")
  cfg.update(prediction="x0", x0_t_min=0.05)
  c = jnp.full((4, 3), 0.7)
  exact = flow.as_velocity(lambda x, t: jnp.broadcast_to(c, x.shape), cfg)  # a network that knows x0
  loss, t = flow.loss_terms(exact, c, jax.random.key(2), cfg)
  # Exact wherever t >= x0_t_min; below it the clipped denominator shrinks the velocity (bounded loss).
  assert float(loss[t >= 0.05].max(initial=0.0)) < 1e-8
  noise = jax.random.normal(jax.random.key(3), (4, 3))
  np.testing.assert_allclose(flow.solve(exact, noise, 10), c, atol=1e-5)  # last step (t=0.1 -> 0) lands on x0
  cfg.prediction = "velocity"
  v = lambda x, t: x
  assert flow.as_velocity(v, cfg) is v


def test_x0_loss_is_the_clean_image_error():
  # A network whose velocity is off by d implies x0_hat = x_t - t v, off by -t d: the x0 loss is t^2 d^2.
  cfg = flow_cfg("uniform")
  x0 = jax.random.normal(jax.random.key(0), (64, 3))
  eps = jax.random.normal(jax.random.key(1), (64, 3))
  t = jnp.linspace(0.1, 0.9, 64)
  d = jnp.arange(3.0) + 1.0
  off = lambda x, tt: (x - x0) / tt.reshape(-1, 1) + d  # the exact velocity (eps - x0) plus d
  vel, _ = flow.loss_terms(off, x0, None, cfg, t=t, eps=eps)
  cfg.loss = "x0"
  x0_loss, _ = flow.loss_terms(off, x0, None, cfg, t=t, eps=eps)
  np.testing.assert_allclose(vel, jnp.mean(d ** 2), rtol=1e-5)
  np.testing.assert_allclose(x0_loss, t ** 2 * jnp.mean(d ** 2), rtol=1e-5)


def _field_and_diffusers_run(scheduler, seed: int):
  """(a fixed nonlinear velocity field of x and t for a numpy / jax module, the start x, diffusers' `scheduler`
  stepped on that field from x: the network at t = its timesteps / 1000)."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((4, 4)).astype(np.float32) * 0.5
  field = lambda lib: lambda x, t: lib.tanh(x @ w) * (1 + t[:, None]) - 0.3 * x
  x = rng.standard_normal((2, 4)).astype(np.float32)
  want = torch.from_numpy(x.copy())
  for t in scheduler.timesteps:
    v = field(np)(want.numpy(), np.full(2, float(t) / 1000, np.float32)).astype(np.float32)
    want = scheduler.step(torch.from_numpy(v), t, want).prev_sample
  assert np.abs(want.numpy() - x).max() > 0.1  # the field moved the sample
  return field, x, want.numpy()


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (2, 3.0), (5, 3.0), (20, 3.0)])
def test_dpmpp_2m_equals_diffusers_flow_dpm_solver(steps, shift):
  """sample.sampler=dpmpp_2m: diffusers' DPMSolverMultistepScheduler(use_flow_sigmas, flow_shift, prediction_type=
  "flow_prediction") (Sana's scheduler) step for step on a fixed nonlinear velocity field: the same sigmas, the
  network at the scheduler's whole-number timesteps, first order at both ends."""
  diffusers = pytest.importorskip("diffusers")
  scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,
                                                    prediction_type="flow_prediction")
  scheduler.set_timesteps(steps)
  np.testing.assert_array_equal(scheduler.sigmas.numpy(), flow.flow_sigmas(steps, shift))
  field, x, want = _field_and_diffusers_run(scheduler, seed=0)
  np.testing.assert_allclose(flow.dpmpp_2m(field(jnp), jnp.asarray(x), steps, shift), want, atol=1e-5)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 3.0), (30, 6.0)])
def test_flow_match_euler_equals_diffusers(steps, shift):
  """sample.sampler=flow_match_euler: diffusers' FlowMatchEulerDiscreteScheduler(shift) (Lumina 2's) step for step:
  its sigmas (the smallest training sigma shifted twice, as diffusers does), the network at t = sigma."""
  diffusers = pytest.importorskip("diffusers")
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
  scheduler.set_timesteps(steps)
  np.testing.assert_allclose(scheduler.sigmas.numpy(), flow.flow_match_sigmas(steps, shift), atol=1e-6)
  field, x, want = _field_and_diffusers_run(scheduler, seed=1)
  np.testing.assert_allclose(flow.flow_match_euler(field(jnp), jnp.asarray(x), steps, shift), want, atol=1e-5)
