"""DDPM, Stable Diffusion's objective (`objective.kind=ddpm`, options in `ddpm`, named as in diffusers' scheduler
configs): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps over `num_train_timesteps` discrete steps.

The network sees t / num_train_timesteps (the denoiser contract's time in [0, 1]; a family whose embedder
takes diffusers' timesteps, as the SD U-Net's does, scales it back) and predicts `prediction_type`: epsilon,
v_prediction or sample. Training: uniform timesteps, optional offset noise and min-SNR-gamma weighting; betas
linear / scaled_linear / squaredcos_cap_v2, optionally rescaled to zero terminal SNR. Samplers, each equal to the diffusers scheduler of the same config step
for step (tests/test_ddpm.py): ddim (DDIMScheduler), pndm (PNDMScheduler, skip_prk_steps), euler
(EulerDiscreteScheduler, optional Karras sigmas), euler_ancestral (EulerAncestralDiscreteScheduler), dpmpp_2m
(DPMSolverMultistepScheduler, dpmsolver++ order 2, midpoint). Each sampler's timesteps and coefficients are
computed once on the host (numpy, as the schedulers do); the loop runs under jit.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lidit_jax import objectives
from lidit_jax.config_checks import fail, one_of
from lidit_jax.objectives import solvers

SAMPLERS = ("ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m")

# diffusers' scheduler_config.json names, SD 1.x's values by default
CONFIG_DEFAULTS = {"ddpm": dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon",  # or v_prediction (SD 2.x 768 px) or sample
    timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False, clip_sample_range=1.0,
    rescale_betas_zero_snr=False, use_karras_sigmas=False,
    eta=0.0,  # DDIM's noise at each step (0: deterministic)
    snr_gamma=0.0,  # > 0: min-SNR-gamma loss weights (5.0 is the paper's)
    offset_noise=0.0,  # > 0: per-channel offset added to the training noise (e.g. 0.05)
    # the keys a pipeline folder's scheduler set (the rest: its class's defaults); another sampler keeps these and
    # takes its own class's defaults for the rest. Empty: every key is kept
    scheduler_keys=())}
SCHEDULER_CLASSES = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "EulerDiscreteScheduler": "euler",
                     "EulerAncestralDiscreteScheduler": "euler_ancestral",
                     "DPMSolverMultistepScheduler": "dpmpp_2m"}
Net = Callable[[jax.Array, jax.Array], jax.Array]  # (model input [B, ...], t / num_train_timesteps [B]) -> output


# ---- the noise schedule (float32, as diffusers stores it) ----

def betas(cfg) -> np.ndarray:
  n, f32 = cfg.num_train_timesteps, np.float32
  if cfg.beta_schedule == "linear":
    b = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=f32)
  elif cfg.beta_schedule == "scaled_linear":  # SD: linear in sqrt(beta)
    b = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=f32) ** 2
  elif cfg.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine abar, betas capped at 0.999
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    b = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], f32)
  else:
    raise ValueError(f"unknown ddpm.beta_schedule {cfg.beta_schedule!r}")
  if cfg.rescale_betas_zero_snr:  # Lin et al. 2024: shift and scale sqrt(abar) so that abar_T = 0
    root = np.sqrt(np.cumprod(1.0 - b, dtype=f32))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    abar = root ** 2
    b = 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return b.astype(f32)


def alphas_cumprod(cfg, sigma_space: bool = False) -> np.ndarray:
  """abar_t. `sigma_space`: for the samplers that step in sigma = sqrt((1 - abar) / abar), a zero terminal abar
  becomes 2^-24 (a finite sigma), as diffusers' Euler and DPM-Solver schedulers set it."""
  ac = np.cumprod(1.0 - betas(cfg), dtype=np.float32)
  if sigma_space and cfg.rescale_betas_zero_snr:
    ac[-1] = 2.0 ** -24
  return ac


def _bcast(a, x):
  return jnp.reshape(a, (-1,) + (1,) * (x.ndim - 1)) if jnp.ndim(a) else a


def x0_and_eps(out, x, abar, prediction: str):
  """The clean sample and the noise a network output implies at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
  a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
  if prediction == "epsilon":
    return (x - s * out) / a, out
  if prediction == "v_prediction":
    return a * x - s * out, a * out + s * x
  return out, (x - a * out) / s  # "sample"


# ---- the learned variance (Nichol & Dhariwal 2021, "Improved DDPM"; PixArt trains it) ----

def posterior(cfg):
  """Per timestep: q(x_{t-1} | x_t, x0)'s mean coefficients of x0 and x_t and its log variance, the first entry
  (t = 0, variance 0) replaced by the second's (guided-diffusion's clipped log variance); and log beta_t."""
  b = betas(cfg).astype(np.float64)
  ac = np.cumprod(1.0 - b)
  prev = np.append(1.0, ac[:-1])
  var = b * (1.0 - prev) / (1.0 - ac)
  return dict(x0=b * np.sqrt(prev) / (1.0 - ac), xt=(1.0 - prev) * np.sqrt(1.0 - b) / (1.0 - ac),
              logvar=np.log(np.append(var[1], var[1:])), logbeta=np.log(b))


def model_log_variance(cfg, t, v):
  """The network's variance output v in [-1, 1] as a log variance between the posterior's (-1) and beta_t's (1)."""
  q = posterior(cfg)
  frac = (v + 1.0) / 2.0
  return frac * _bcast(jnp.asarray(q["logbeta"], jnp.float32)[t], v) + \
      (1.0 - frac) * _bcast(jnp.asarray(q["logvar"], jnp.float32)[t], v)


def _std_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))  # guided-diffusion's


def _decoder_nll(x0, mean, log_scale):
  """-log p(x0) of 256 bins over [-1, 1] under N(mean, exp(log_scale)^2), the edge bins open-ended."""
  inv = jnp.exp(-log_scale)
  up, down = _std_normal_cdf(inv * (x0 - mean + 1 / 255)), _std_normal_cdf(inv * (x0 - mean - 1 / 255))
  log_p = jnp.where(x0 < -0.999, jnp.log(jnp.maximum(up, 1e-12)),
                    jnp.where(x0 > 0.999, jnp.log(jnp.maximum(1.0 - down, 1e-12)),
                              jnp.log(jnp.maximum(up - down, 1e-12))))
  return -log_p


def variational_bound(cfg, x0, x_t, t, out, v):
  """Per example, in bits per dimension: KL(q(x_{t-1} | x_t, x0) || the model's step), whose mean comes from the
  prediction `out` (held fixed by the caller: only the variance learns from this term) and whose log variance
  from `v`; at t = 0 the decoder's discretised likelihood instead. PixArt's loss is the MSE plus this."""
  q = {k: jnp.asarray(a, jnp.float32) for k, a in posterior(cfg).items()}
  at = lambda k: _bcast(q[k][t], x0)
  abar = _bcast(jnp.asarray(alphas_cumprod(cfg))[t], x0)
  x0_hat = x0_and_eps(out, x_t, abar, cfg.prediction_type)[0]
  true_mean, mean = at("x0") * x0 + at("xt") * x_t, at("x0") * x0_hat + at("xt") * x_t
  logvar, true_logvar = model_log_variance(cfg, t, v), at("logvar")
  kl = 0.5 * (-1.0 + logvar - true_logvar + jnp.exp(true_logvar - logvar) + (true_mean - mean) ** 2 * jnp.exp(-logvar))
  flat = lambda a: jnp.mean(a.reshape(a.shape[0], -1), axis=1) / math.log(2.0)
  return jnp.where(t == 0, flat(_decoder_nll(x0, mean, 0.5 * logvar)), flat(kl))


# ---- timesteps as the schedulers space them ----

def spaced_timesteps(cfg, steps: int, spacing: str | None = None, extra: int = 0) -> np.ndarray:
  """Descending timesteps of `steps` inference steps (DDIM / Euler layout); `extra` = 1 gives DPM-Solver's layout
  (steps + 1 points, the last dropped)."""
  n, spacing = cfg.num_train_timesteps, spacing or cfg.timestep_spacing
  if spacing == "linspace":
    return np.linspace(0, n - 1, steps + extra).round()[::-1][:steps].astype(np.int64) if extra else \
        np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
  if spacing == "leading":
    ratio = n // (steps + extra)
    return (np.arange(0, steps + extra) * ratio).round()[::-1][:steps].astype(np.int64) + cfg.steps_offset
  if spacing == "trailing":
    return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
  raise ValueError(f"unknown ddpm.timestep_spacing {spacing!r}")


def _sigma_to_t(sigma, log_sigmas):
  """The fractional training timestep of a sigma (interpolated in log sigma), as diffusers' Karras path does."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  low = np.clip(np.cumsum(log_sigma - log_sigmas[:, None] >= 0, axis=0).argmax(axis=0), None, len(log_sigmas) - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  return (1 - w) * low + w * (low + 1)


def _karras(sigmas, steps: int, rho: float = 7.0):
  lo, hi = float(sigmas[-1]) ** (1 / rho), float(sigmas[0]) ** (1 / rho)
  return (hi + np.linspace(0, 1, steps) * (lo - hi)) ** rho


def euler_sigmas(cfg, ac, steps: int, karras: bool = False):
  """(timesteps the network sees, sigmas with a final 0) of Euler-type schedulers (variance-exploding sigmas)."""
  n = cfg.num_train_timesteps
  if cfg.timestep_spacing == "linspace":
    ts = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
  else:
    ts = spaced_timesteps(cfg, steps).astype(np.float32)
  all_sigmas = np.sqrt((1 - ac) / ac)
  sigmas = np.interp(ts, np.arange(n), all_sigmas)
  if karras:
    sigmas = _karras(sigmas, steps)
    ts = _sigma_to_t(sigmas, np.log(all_sigmas))
  return ts.astype(np.float32), np.concatenate([sigmas, [0.0]]).astype(np.float32)


# ---- the samplers: host tables, then one jitted loop each ----

@dataclasses.dataclass(frozen=True)
class DDPM:
  """The objective contract (`objectives`) for DDPM; `cfg` is the config's `ddpm` section. `variance`: the network
  outputs [prediction, variance] channels (geometry.variance: PixArt's learned sigma), which training learns by
  IDDPM's variational bound and sampling drops, as diffusers' pipelines do."""
  cfg: Any
  variance: bool = False

  @property
  def num_train_timesteps(self) -> int:
    return self.cfg.num_train_timesteps

  def draw(self, rng_t, rng_noise, x0) -> dict:
    b = x0.shape[0]
    t = jax.random.randint(rng_t, (b,), 0, self.num_train_timesteps)
    r_eps, r_offset = jax.random.split(rng_noise)
    eps = jax.random.normal(r_eps, x0.shape, x0.dtype)
    if self.cfg.offset_noise:  # one extra draw per example and channel (diffusers' `noise_offset`)
      eps = eps + self.cfg.offset_noise * jax.random.normal(r_offset, (b,) + (1,) * (x0.ndim - 2) + x0.shape[-1:])
    return {"t": t.astype(jnp.float32), "eps": eps}

  def loss(self, net: Net, x0, draws):
    """Per-example MSE of the prediction target; min-SNR-gamma weights (Hang et al. 2023) when `snr_gamma` > 0."""
    t, eps = draws["t"].astype(jnp.int32), draws["eps"]
    abar = jnp.asarray(alphas_cumprod(self.cfg))[t]
    a, s = _bcast(jnp.sqrt(abar), x0), _bcast(jnp.sqrt(1.0 - abar), x0)
    x_t = a * x0 + s * eps
    out = net(x_t, t.astype(jnp.float32) / self.num_train_timesteps).astype(jnp.float32)
    if self.variance:
      out, v = jnp.split(out, 2, axis=-1)
    kind = self.cfg.prediction_type
    target = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[kind]
    err = jnp.mean(((out - target) ** 2).reshape(x0.shape[0], -1), axis=1)
    gamma = self.cfg.snr_gamma
    if gamma:
      snr = abar / (1.0 - abar)
      err = err * {"epsilon": jnp.minimum(1.0, gamma / snr),  # min(snr, g) / snr, 1 at snr = 0
                   "v_prediction": jnp.minimum(snr, gamma) / (snr + 1.0),
                   "sample": jnp.minimum(snr, gamma)}[kind]
    if self.variance:
      err = err + variational_bound(self.cfg, x0, x_t, t, jax.lax.stop_gradient(out), v)
    return err

  def sample(self, net: Net, noise, steps: int, sampler: str, rng=None):
    """Integrate from unit `noise` (scaled here by the scheduler's init_noise_sigma, as diffusers' pipelines do
    with given latents) to the clean sample. `rng`: the fresh noise of euler_ancestral (and of ddim with eta > 0)."""
    fn = {"ddim": self._ddim, "pndm": self._pndm, "euler": self._euler, "euler_ancestral": self._euler,
          "dpmpp_2m": self._dpmpp_2m}.get(sampler)
    if fn is None:
      raise ValueError(f"unknown DDPM sampler {sampler!r}; use one of {SAMPLERS}")
    if rng is None and (sampler == "euler_ancestral" or (sampler == "ddim" and self.cfg.eta > 0)):
      raise ValueError(f"sampler {sampler!r} draws noise at every step: pass rng")
    return fn(objectives.mean_only(net, self.variance), noise.astype(jnp.float32), steps, sampler, rng)

  def _time(self, t, x):
    return jnp.full((x.shape[0],), t / self.num_train_timesteps, jnp.float32)

  def _final_abar(self, ac):
    return 1.0 if self.cfg.set_alpha_to_one else float(ac[0])

  def _ddim(self, net, x, steps, sampler, rng):
    cfg, ac = self.cfg, alphas_cumprod(self.cfg)
    ts = spaced_timesteps(cfg, steps)
    prev = ts - cfg.num_train_timesteps // steps
    a_t = ac[ts].astype(np.float64)
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], self._final_abar(ac)).astype(np.float64)
    std = cfg.eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    tab = {k: jnp.asarray(v, jnp.float32) for k, v in dict(
        t=ts, a_t=a_t, a_prev=a_prev, std=std, direction=np.sqrt(np.maximum(1 - a_prev - std ** 2, 0.0))).items()}

    def body(i, x):
      out = net(x, self._time(tab["t"][i], x)).astype(jnp.float32)
      x0, eps = x0_and_eps(out, x, tab["a_t"][i], cfg.prediction_type)
      if cfg.clip_sample:  # the direction keeps the unclipped eps, as DDIMScheduler does by default
        x0 = jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
      x = jnp.sqrt(tab["a_prev"][i]) * x0 + tab["direction"][i] * eps
      if cfg.eta > 0:
        x = x + tab["std"][i] * jax.random.normal(jax.random.fold_in(rng, i), x.shape)
      return x
    return jax.lax.fori_loop(0, len(ts), body, x)

  def _pndm(self, net, x, steps, sampler, rng):
    """PLMS with skip_prk_steps (SD's config): one Euler-like step, its trapezoidal correction from the same
    start (two evaluations, one at a repeated timestep), then Adams-Bashforth of order 2, 3, 4 on eps."""
    cfg, ac = self.cfg, alphas_cumprod(self.cfg)
    if cfg.prediction_type == "sample":
      fail("ddpm.prediction_type", "sample", "PNDM steps on epsilon or v_prediction", "use another sampler")
    n, ratio = cfg.num_train_timesteps, cfg.num_train_timesteps // steps
    if cfg.timestep_spacing == "linspace":
      base = np.linspace(0, n - 1, steps).round().astype(np.int64)
    elif cfg.timestep_spacing == "leading":
      base = np.arange(0, steps) * ratio + cfg.steps_offset
    else:
      base = np.round(np.arange(n, 0, -n / steps))[::-1].astype(np.int64) - 1
    ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]  # the model's timesteps (one repeated)
    k = len(ts)
    frm, to = ts.copy(), ts - ratio  # the step each call takes: from its timestep to the next
    frm[1], to[1] = ts[1] + ratio, ts[1]  # the correction restarts from the first timestep
    # weights of (this output, the last three stored outputs), newest first
    w = np.zeros((k, 4))
    w[0] = (1, 0, 0, 0)
    w[1] = (0.5, 0.5, 0, 0)
    if k > 2:
      w[2] = (1.5, -0.5, 0, 0)
    if k > 3:
      w[3] = (23 / 12, -16 / 12, 5 / 12, 0)
    w[4:] = (55 / 24, -59 / 24, 37 / 24, -9 / 24)
    a_t = ac[frm].astype(np.float64)
    a_prev = np.where(to >= 0, ac[np.maximum(to, 0)], self._final_abar(ac)).astype(np.float64)
    denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
    tab = {key: jnp.asarray(v, jnp.float32) for key, v in dict(
        t=ts, a_t=a_t, x_coef=np.sqrt(a_prev / a_t), e_coef=(a_prev - a_t) / denom, w=w).items()}

    def body(i, carry):
      x, start, hist = carry  # start: the first step's sample (for the correction); hist: stored outputs
      out = net(x, self._time(tab["t"][i], x)).astype(jnp.float32)
      wi = tab["w"][i]
      mixed = wi[0] * out + jnp.einsum("k,k...->...", wi[1:], hist)
      base_x = jnp.where(i == 1, start, x)
      eps = mixed if cfg.prediction_type == "epsilon" else x0_and_eps(mixed, base_x, tab["a_t"][i], "v_prediction")[1]
      new_x = tab["x_coef"][i] * base_x - tab["e_coef"][i] * eps
      hist = jnp.where(i == 1, hist, jnp.concatenate([out[None], hist[:-1]]))  # the correction stores nothing
      return new_x, jnp.where(i == 0, x, start), hist
    hist = jnp.zeros((3,) + x.shape, jnp.float32)
    return jax.lax.fori_loop(0, k, body, (x, x, hist))[0]

  def _euler(self, net, x, steps, sampler, rng):
    cfg, ac = self.cfg, alphas_cumprod(self.cfg, sigma_space=True)
    ts, sig = euler_sigmas(cfg, ac, steps, karras=cfg.use_karras_sigmas and sampler == "euler")
    s, s_next = sig[:-1].astype(np.float64), sig[1:].astype(np.float64)
    up = np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) if sampler == "euler_ancestral" else np.zeros_like(s)
    down = np.sqrt(s_next ** 2 - up ** 2)
    init = sig.max() if cfg.timestep_spacing in ("linspace", "trailing") else math.sqrt(float(sig.max()) ** 2 + 1)
    tab = {k: jnp.asarray(v, jnp.float32) for k, v in dict(t=ts, s=s, to=down, up=up).items()}

    def body(i, x):
      sigma = tab["s"][i]
      out = net(x / jnp.sqrt(sigma ** 2 + 1), self._time(tab["t"][i], x)).astype(jnp.float32)
      if cfg.prediction_type == "epsilon":
        x0 = x - sigma * out
      elif cfg.prediction_type == "v_prediction":
        x0 = out * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + x / (sigma ** 2 + 1)
      else:
        x0 = out
      x = x + (x - x0) / sigma * (tab["to"][i] - sigma)
      if sampler == "euler_ancestral":
        x = x + tab["up"][i] * jax.random.normal(jax.random.fold_in(rng, i), x.shape)
      return x
    return jax.lax.fori_loop(0, len(ts), body, x * jnp.float32(init))

  def _dpmpp_2m(self, net, x, steps, sampler, rng):
    """DPM-Solver++ 2M on x0 predictions: first order at the first and the last step (the final sigma is 0),
    second order (midpoint) between."""
    cfg, ac = self.cfg, alphas_cumprod(self.cfg, sigma_space=True)
    all_sigmas = np.sqrt((1 - ac) / ac)
    ts = spaced_timesteps(cfg, steps, extra=1)
    if cfg.use_karras_sigmas:
      sig = _karras(all_sigmas[::-1], steps)  # from the schedule's largest sigma to its smallest
      ts = _sigma_to_t(sig, np.log(all_sigmas))
      if cfg.beta_schedule != "squaredcos_cap_v2":
        ts = ts.round()
    else:
      sig = np.interp(ts, np.arange(len(ac)), all_sigmas)
    sig = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)
    alpha = 1 / np.sqrt(sig ** 2 + 1)
    tab = {key: jnp.asarray(v, jnp.float32) for key, v in dict(
        t=ts, abar=alpha[:-1] ** 2, **solvers.dpmpp_2m_tables(alpha, sig * alpha)).items()}  # VP: sigma alpha

    def x0_of(i, x):
      out = net(x, self._time(tab["t"][i], x)).astype(jnp.float32)
      return x0_and_eps(out, x, tab["abar"][i], cfg.prediction_type)[0]
    return solvers.dpmpp_2m(x0_of, x, tab, len(ts))


_COMMON_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                       prediction_type="epsilon", steps_offset=0, rescale_betas_zero_snr=False)
# Each diffusers scheduler class's constructor defaults, where they differ: what a config field that was never
# set explicitly means (diffusers' `from_config` drops the fields a config lists in `_use_default_values`).
CLASS_DEFAULTS = {
    "ddim": dict(_COMMON_DEFAULTS, timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True,
                 clip_sample_range=1.0),
    "pndm": dict(_COMMON_DEFAULTS, timestep_spacing="leading", set_alpha_to_one=False),
    "euler": dict(_COMMON_DEFAULTS, timestep_spacing="linspace", use_karras_sigmas=False),
    "euler_ancestral": dict(_COMMON_DEFAULTS, timestep_spacing="linspace"),
    "dpmpp_2m": dict(_COMMON_DEFAULTS, timestep_spacing="linspace", use_karras_sigmas=False),
}
_SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                   "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample", "clip_sample_range",
                   "rescale_betas_zero_snr", "use_karras_sigmas")


def from_scheduler_config(d: dict) -> tuple[dict, str]:
  """A diffusers scheduler_config.json -> (the values it sets explicitly, the sampler it names)."""
  sampler = SCHEDULER_CLASSES.get(d.get("_class_name", ""))
  if sampler is None:
    raise ValueError(f"scheduler {d.get('_class_name')!r} has no sampler here. Fix: use one of "
                     f"{sorted(SCHEDULER_CLASSES)} (or pass scheduler=...)")
  implicit = set(d.get("_use_default_values") or ())
  return {k: d[k] for k in _SCHEDULER_KEYS if d.get(k) is not None and k not in implicit}, sampler


def scheduler_section(values: dict, sampler: str, base):
  """The `ddpm` section (a copy of `base`) that samples as diffusers' class for `sampler` built from a config
  holding `values` (`OtherScheduler.from_config(scheduler.config)`): the class's defaults, then the values."""
  section = copy.deepcopy(base)
  for k, v in {**CLASS_DEFAULTS[sampler], **values}.items():
    section[k] = float(v) if isinstance(section[k], float) else v
  return section


def validate(d, sample) -> None:
  """The `ddpm` section (`d`) and its samplers."""
  one_of("ddpm.beta_schedule", d.beta_schedule, {"linear", "scaled_linear", "squaredcos_cap_v2"})
  one_of("ddpm.prediction_type", d.prediction_type, {"epsilon", "v_prediction", "sample"})
  one_of("ddpm.timestep_spacing", d.timestep_spacing, {"leading", "trailing", "linspace"})
  one_of("sample.sampler", sample.sampler, set(SAMPLERS))
  if d.num_train_timesteps < 2:
    fail("ddpm.num_train_timesteps", d.num_train_timesteps, "must be at least 2", "use 1000 (SD)")
  if d.snr_gamma < 0 or d.offset_noise < 0 or d.eta < 0:
    fail("ddpm.snr_gamma/offset_noise/eta", (d.snr_gamma, d.offset_noise, d.eta), "must be >= 0", "use 0 to turn off")
  if sample.cfg_trunc < 1.0:
    fail("sample.cfg_trunc", sample.cfg_trunc, "is for flow models (the DDPM samplers guide every step)", "use 1.0")
  if sample.steps > d.num_train_timesteps:
    fail("sample.steps", sample.steps, f"more than ddpm.num_train_timesteps={d.num_train_timesteps}",
         "use fewer steps")


def build(d, sample=None, geometry=None) -> DDPM:
  return DDPM(d, bool(geometry and geometry.variance))  # its times do not depend on the image's size


def with_scheduler(d, sample, scheduler, geometry=None) -> tuple[DDPM, str]:
  """(objective, sampler) for `scheduler`: None (the config's), another sampler name on the config's scheduler
  (as diffusers' `OtherScheduler.from_config(pipe.scheduler.config)`: the keys it set, `ddpm.scheduler_keys`,
  kept, the new class's defaults for the rest), or a diffusers scheduler config dict."""
  variance = bool(geometry and geometry.variance)
  # what no scheduler config sets comes from the defaults (a scheduler key) or stays the config's (eta, training)
  base = ml_collections.ConfigDict(CONFIG_DEFAULTS["ddpm"])
  base.update({k: v for k, v in d.items() if k not in _SCHEDULER_KEYS})
  if isinstance(scheduler, dict):
    values, sampler = from_scheduler_config(scheduler)
    return DDPM(scheduler_section(values, sampler, base), variance), sampler
  sampler = scheduler or sample.sampler
  if sampler not in SAMPLERS:
    raise ValueError(f"scheduler={sampler!r} is not a sampler of objective.kind='ddpm'. Fix: use one of {SAMPLERS} "
                     "or a diffusers scheduler config dict")
  if d.get("scheduler_keys") and sampler != sample.sampler:
    d = scheduler_section({k: d[k] for k in d.scheduler_keys}, sampler, base)
  return DDPM(d, variance), sampler
