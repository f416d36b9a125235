"""Rectified flow (`objective.kind=rectified_flow`, options in `flow`): x_t = (1 - t) x0 + t eps, velocity
target v = eps - x0; t = 1 is pure noise.

The network predicts the velocity, or the clean image (`as_velocity`). Training timesteps: uniform, logit-normal (SD3) or "mode" density, then an optional shift
t' = k t / (1 + (k - 1) t); with `resolution_shift` k comes from the image token count as in Flux
(mu linear from (256 tokens, 0.5) to (4096 tokens, 1.15), k = e^mu). Sampling integrates the ODE
from t = 1 to t = 0 with Euler or Heun steps, or as diffusers' flow schedulers step (each equal to it step for step,
tests/test_flow.py): dpmpp_2m (DPMSolverMultistepScheduler with use_flow_sigmas: Sana's) and flow_match_euler
(FlowMatchEulerDiscreteScheduler, static shift: Lumina 2's), with classifier-free guidance. The loss is the velocity MSE or the x0 MSE (`flow.loss`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax import objectives
from lidit_jax.config_checks import fail, one_of
from lidit_jax.objectives import solvers

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B, ...], t [B]) -> v [B, ...]


def shift_time(t, shift: float):
  """Move t towards the noisy end (shift > 1); the identity at shift = 1."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(num_tokens: int, base: tuple[int, float] = (256, 0.5), top: tuple[int, float] = (4096, 1.15)):
  slope = (top[1] - base[1]) / (top[0] - base[0])
  return math.exp(base[1] + slope * (num_tokens - base[0]))


def effective_shift(flow_cfg, num_tokens: int) -> float:
  return resolution_shift(num_tokens) if flow_cfg.resolution_shift else float(flow_cfg.shift)


def sample_timesteps(rng, batch: int, flow_cfg, shift: float = 1.0):
  """Training times for one batch. A fraction `flow.unshifted` of the examples skips the shift, so that a run
  shifted towards noise (where layouts are decided) still trains the low-noise end (where edges are)."""
  frac = flow_cfg.unshifted
  if frac > 0.0:
    rng, r_mix = jax.random.split(rng)
  kind = flow_cfg.timestep
  if kind == "uniform":
    t = jax.random.uniform(rng, (batch,))
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(flow_cfg.logit_mean + flow_cfg.logit_std * jax.random.normal(rng, (batch,)))
  elif kind == "mode":
    u = jax.random.uniform(rng, (batch,))
    t = 1.0 - u - flow_cfg.mode_scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1.0 + u)
  else:
    raise ValueError(f"unknown flow.timestep {kind!r}")
  t = jnp.clip(t, 1e-5, 1.0 - 1e-5)
  if frac > 0.0:
    return jnp.where(jax.random.uniform(r_mix, (batch,)) < frac, t, shift_time(t, shift))
  return shift_time(t, shift)


def as_velocity(model_fn, flow_cfg):
  """The network's output as a velocity. `flow.prediction="velocity"`: it is one. "x0": the network predicts the
  clean image and v = (x_t - x0_hat) / t, t clipped below at `flow.x0_t_min` (JiT, Li & He 2025: a clean image is
  an easier target than noise for a pixel-space transformer; the loss stays the velocity MSE, the last sampling
  step lands on the prediction itself). `model_fn(x_t, t, *rest)`; the same signature comes back."""
  if flow_cfg.prediction == "velocity":
    return model_fn

  def velocity(x, t, *rest, **kw):
    x0 = model_fn(x, t, *rest, **kw).astype(jnp.float32)
    tt = jnp.maximum(t, flow_cfg.x0_t_min).reshape((-1,) + (1,) * (x.ndim - 1))
    return (x - x0) / tt
  return velocity


def interpolate(x0, eps, t):
  tt = t.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (1.0 - tt) * x0 + tt * eps


def loss_terms(velocity: VelocityFn, x0, rng, flow_cfg, shift: float = 1.0, t=None, eps=None):
  """Mean squared error (per example) for one batch; returns (loss_B, t_B). `flow.loss="velocity"`: of the
  velocity; "x0": of the clean image it implies, x0_hat = x_t - t v, so the velocity error is weighted by
  max(t, x0_t_min)^2 (the high-noise times, where layouts are decided, count as much as the low-noise ones).
  `t` and `eps` are drawn from `rng` unless given (gradient accumulation draws them for the whole batch)."""
  if t is None or eps is None:
    rt, re = jax.random.split(rng)
    t = sample_timesteps(rt, x0.shape[0], flow_cfg, shift)
    eps = jax.random.normal(re, x0.shape, x0.dtype)
  v = velocity(interpolate(x0, eps, t), t)
  err = jnp.mean(((v.astype(jnp.float32) - (eps - x0)) ** 2).reshape(x0.shape[0], -1), axis=1)
  if flow_cfg.loss == "x0":
    err = err * jnp.maximum(t, flow_cfg.x0_t_min) ** 2
  return err, t


def sampling_times(steps: int, shift: float = 1.0):
  return shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


def solve(velocity: VelocityFn, noise, steps: int, sampler: str = "euler", shift: float = 1.0):
  """Integrate dx/dt = v from t = 1 (noise) to t = 0; Heun costs 2 evaluations per step. The velocity of
  rectified flow is finite at t = 0, so Heun corrects the last step too."""
  ts = sampling_times(steps, shift)
  b = noise.shape[0]

  def step(i, x):
    t, t_next = ts[i], ts[i + 1]
    dt = t_next - t
    v = velocity(x, jnp.full((b,), t))
    x_euler = x + dt * v
    if sampler == "euler":
      return x_euler
    v_next = velocity(x_euler, jnp.full((b,), t_next))
    return x + dt * 0.5 * (v + v_next)

  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; use one of {SAMPLERS}")
  return jax.lax.fori_loop(0, steps, step, noise)


@dataclasses.dataclass(frozen=True)
class RectifiedFlow:
  """The objective contract (`objectives`) for rectified flow: `net` outputs are turned into velocities by
  `as_velocity` (flow.prediction), the loss is the per-example velocity MSE, sampling integrates the ODE."""
  cfg: Any  # the config's `flow` section
  shift: float  # training time shift (fixed, or from the image token count)
  sample_shift: float
  variance: bool = False  # the net's output carries a learned variance too (geometry.variance): not used here

  def draw(self, rng_t, rng_noise, x0) -> dict:
    return {"t": sample_timesteps(rng_t, x0.shape[0], self.cfg, self.shift),
            "eps": jax.random.normal(rng_noise, x0.shape, x0.dtype)}

  def loss(self, net, x0, draws):
    net = objectives.mean_only(net, self.variance)
    return loss_terms(as_velocity(net, self.cfg), x0, None, self.cfg, self.shift, t=draws["t"], eps=draws["eps"])[0]

  def sample(self, net, noise, steps: int, sampler: str, rng=None):
    del rng  # the ODE samplers draw nothing
    net = objectives.mean_only(net, self.variance)
    if sampler == "dpmpp_2m":
      return dpmpp_2m(as_velocity(net, self.cfg), noise, steps, self.sample_shift, self.cfg.num_train_timesteps)
    if sampler == "flow_match_euler":
      return flow_match_euler(as_velocity(net, self.cfg), noise, steps, self.sample_shift, self.cfg.num_train_timesteps,
                              self.cfg.sigma_grid)
    return solve(as_velocity(net, self.cfg), noise, steps, sampler, self.sample_shift)

  def step_times(self, steps: int, sampler: str) -> np.ndarray:
    """The time the network sees at each step (its first call of a Heun step), descending: `sample.cfg_trunc`."""
    t = self.cfg.num_train_timesteps
    if sampler == "dpmpp_2m":
      return dpmpp_times(flow_sigmas(steps, self.sample_shift, t).astype(np.float64), t)
    if sampler == "flow_match_euler":
      return flow_match_sigmas(steps, self.sample_shift, t, self.cfg.sigma_grid)[:-1]
    return np.asarray(sampling_times(steps, self.sample_shift))[:-1]


def flow_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
  """diffusers' DPMSolverMultistepScheduler sigmas with use_flow_sigmas (Sana's scheduler): 1 - linspace(1, 1 / T,
  steps + 1), shifted, descending, the last dropped; then the final 0."""
  s = 1.0 - np.linspace(1, 1 / num_train_timesteps, steps + 1)
  s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1]
  return np.concatenate([s, [0.0]]).astype(np.float32)


def dpmpp_times(sigmas: np.ndarray, num_train_timesteps: int) -> np.ndarray:
  """The times the network sees at DPM-Solver++'s steps: the scheduler's int64 timesteps, whole 1 / T."""
  return np.trunc(sigmas[:-1] * num_train_timesteps) / num_train_timesteps


def dpmpp_2m(velocity: VelocityFn, noise, steps: int, shift: float = 1.0, num_train_timesteps: int = 1000):
  """DPM-Solver++ 2M on the clean sample x - t v, over diffusers' flow sigmas (alpha = 1 - t, sigma = t), as its
  DPMSolverMultistepScheduler(use_flow_sigmas, flow_shift=shift, prediction_type="flow_prediction") steps; the
  network sees the scheduler's timesteps, whole numbers of 1 / T (it keeps them as int64)."""
  sig = flow_sigmas(steps, shift, num_train_timesteps).astype(np.float64)
  tab = {k: jnp.asarray(v, jnp.float32) for k, v in dict(
      t=dpmpp_times(sig, num_train_timesteps), sigma=sig[:-1], **solvers.dpmpp_2m_tables(1.0 - sig, sig)).items()}
  b = noise.shape[0]

  def x0_of(i, x):
    return x - tab["sigma"][i] * velocity(x, jnp.full((b,), tab["t"][i])).astype(jnp.float32)
  return solvers.dpmpp_2m(x0_of, noise.astype(jnp.float32), tab, steps)


def flow_match_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000, grid: str = "scheduler") -> np.ndarray:
  """diffusers' FlowMatchEulerDiscreteScheduler sigmas (static shift), then the final 0. `grid` "scheduler": its own
  (`set_timesteps(steps)`: evenly spaced between its largest and its smallest training sigma, the latter already
  shifted, then shifted); "linspace": those Lumina 2's and Flux's pipelines pass it (1 .. 1 / steps, shifted)."""
  t = num_train_timesteps
  shifted = lambda s: shift * s / (1 + (shift - 1) * s)
  if grid == "linspace":
    return np.concatenate([shifted(np.linspace(1.0, 1.0 / steps, steps, dtype=np.float32)), [0.0]]).astype(np.float32)
  lo = shifted(np.float32(1.0 / t))
  s = np.linspace(t, float(lo) * t, steps, dtype=np.float64) / t
  return np.concatenate([shifted(s), [0.0]]).astype(np.float32)


def flow_match_euler(velocity: VelocityFn, noise, steps: int, shift: float = 1.0, num_train_timesteps: int = 1000,
                     grid: str = "scheduler"):
  """Euler steps over `flow_match_sigmas`, as diffusers' FlowMatchEulerDiscreteScheduler (Lumina 2's, and an
  alternative of Sana's): the network at t = sigma, x' = x + (sigma' - sigma) v."""
  sig = jnp.asarray(flow_match_sigmas(steps, shift, num_train_timesteps, grid))
  b = noise.shape[0]
  step = lambda i, x: x + (sig[i + 1] - sig[i]) * velocity(x, jnp.full((b,), sig[i])).astype(jnp.float32)
  return jax.lax.fori_loop(0, steps, step, noise.astype(jnp.float32))


SAMPLERS = ("euler", "heun", "dpmpp_2m", "flow_match_euler")

# diffusers' flow schedulers: {class: (our sampler, its shift's key, {key: the only value we implement})}; a value
# that is absent or None in the config takes the class's default, which is the one implemented, but for REQUIRED
SCHEDULERS = {
    "DPMSolverMultistepScheduler": ("dpmpp_2m", "flow_shift", dict(
        use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2,
        solver_type="midpoint", lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
        thresholding=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False)),
    "FlowMatchEulerDiscreteScheduler": ("flow_match_euler", "shift", dict(
        use_dynamic_shifting=False, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=False, time_shift_type="exponential",
        timestep_spacing="linspace")),
}
REQUIRED = ("use_flow_sigmas", "prediction_type")  # a DPM-Solver without them steps DDPM's schedule


def from_scheduler_config(d: dict, where: str = "scheduler_config.json") -> dict:
  """A diffusers flow scheduler's config -> {sampler, shift, num_train_timesteps}; what it sets that the samplers do
  not implement is refused by name (ValueError)."""
  name = d.get("_class_name")
  if name not in SCHEDULERS:
    raise ValueError(f"{where}: scheduler {name!r} has no rectified-flow sampler here. Fix: use one of "
                     f"{sorted(SCHEDULERS)}")
  sampler, shift_key, fixed = SCHEDULERS[name]
  for key, value in fixed.items():
    if (d.get(key) is not None or key in REQUIRED) and d.get(key) != value:
      raise ValueError(f"{where}: {name} with {key}={d[key]!r} is not implemented (only {value!r}). Fix: set it "
                       "to that, or extend objectives/flow.py")
  return {"sampler": sampler, "shift": float(d.get(shift_key) or 1.0),
          "num_train_timesteps": int(d.get("num_train_timesteps") or 1000)}

CONFIG_DEFAULTS = {"flow": dict(
    prediction="velocity",  # the network's output: "velocity", or "x0" (the clean image; as_velocity)
    x0_t_min=0.05,  # x0: t is clipped below at this value when turning the output into a velocity
    loss="velocity",  # the MSE of the velocity, or of the clean image it implies ("x0": weight t^2)
    timestep="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, shift=1.0, resolution_shift=False,
    unshifted=0.0,  # fraction of training times drawn without the shift (both ends trained)
    num_train_timesteps=1000,  # diffusers' flow schedulers' T: the dpmpp_2m sampler's sigma grid
    sigma_grid="scheduler")}  # flow_match_euler's steps: the scheduler's own, or "linspace" (Lumina 2's pipeline)


def validate(flow, sample) -> None:
  """The `flow` section and its samplers, each a ConfigError naming value and fix."""
  one_of("flow.timestep", flow.timestep, {"uniform", "logit_normal", "mode"})
  one_of("flow.prediction", flow.prediction, {"velocity", "x0"})
  one_of("flow.loss", flow.loss, {"velocity", "x0"})
  if not 0 < flow.x0_t_min < 1:
    fail("flow.x0_t_min", flow.x0_t_min, "must be in (0, 1)", "use e.g. 0.05")
  if flow.shift <= 0:
    fail("flow.shift", flow.shift, "must be positive", "use 1.0 for no shift")
  if not 0.0 <= flow.unshifted <= 1.0:
    fail("flow.unshifted", flow.unshifted, "must be a fraction in [0, 1]", "use e.g. 0.5")
  if sample.shift < 0:
    fail("sample.shift", sample.shift, "must be >= 0", "use 0 for the training shift, 1.0 for none")
  one_of("sample.sampler", sample.sampler, set(SAMPLERS))
  one_of("flow.sigma_grid", flow.sigma_grid, {"scheduler", "linspace"})


def build(flow, sample, geometry) -> RectifiedFlow:
  """The shift needs the denoiser's image token count (Flux's rule; `denoisers.Geometry`)."""
  shift = effective_shift(flow, geometry.image_tokens)
  return RectifiedFlow(flow, shift, sample.shift or shift, geometry.variance)
