"""PixArt's learned variance (IDDPM): the DDPM objective's log variance and posterior step against diffusers'
DDPMScheduler(variance_type="learned_range"), the variational bound against the closed-form Gaussian KL and the
exact discretised likelihood, and the gradients: the bound teaches the variance channels only."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from lidit_jax import configs
from lidit_jax.objectives import ddpm

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PIXART = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def _section(prediction="epsilon"):
  return ml_collections.ConfigDict({**configs.base_config().ddpm.to_dict(), **PIXART, "prediction_type": prediction})


def _scheduler(prediction="epsilon"):
  return diffusers.DDPMScheduler(**PIXART, variance_type="learned_range", prediction_type=prediction, clip_sample=False)


@pytest.mark.parametrize("t", [0, 1, 7, 500, 999])
def test_log_variance_and_posterior_step_are_diffusers_learned_range(t):
  rng = np.random.default_rng(t)
  x0, x_t, eps, v = (rng.standard_normal((2, 4, 4, 3)).astype(np.float32) for _ in range(4))
  v = np.tanh(v)
  sched, cfg = _scheduler(), _section()
  ours = np.asarray(ddpm.model_log_variance(cfg, jnp.full((2,), t), v))
  if t > 0:  # diffusers keeps the unclipped (zero) posterior variance at t = 0
    want = sched._get_variance(t, torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
  # diffusers' step: the posterior mean from the predicted x0, plus exp(logvar / 2) times its noise
  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  out = to_torch(np.concatenate([eps, v], axis=-1))
  prev = sched.step(out, t, to_torch(x_t), generator=torch.Generator().manual_seed(0)).prev_sample
  if t > 0:
    noise = diffusers.utils.torch_utils.randn_tensor(prev.shape, generator=torch.Generator().manual_seed(0))
    prev = prev - torch.exp(0.5 * torch.from_numpy(ours.transpose(0, 3, 1, 2))) * noise
  q = ddpm.posterior(cfg)
  abar = ddpm.alphas_cumprod(cfg)[t]
  x0_hat = (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
  np.testing.assert_allclose(q["x0"][t] * x0_hat + q["xt"][t] * x_t, prev.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_bound_is_the_gaussian_kl_and_the_exact_decoder_likelihood(prediction):
  cfg = _section(prediction)
  rng = np.random.default_rng(1)
  x0 = np.clip(rng.standard_normal((3, 4, 4, 2)), -1, 1).astype(np.float32)
  x_t, out = (rng.standard_normal(x0.shape).astype(np.float32) for _ in range(2))
  v = np.tanh(rng.standard_normal(x0.shape)).astype(np.float32)
  t = np.array([0, 3, 640])
  got = np.asarray(ddpm.variational_bound(cfg, x0, x_t, jnp.asarray(t), out, v))
  q = ddpm.posterior(cfg)
  abar = ddpm.alphas_cumprod(cfg)[t][:, None, None, None].astype(np.float64)
  x0_hat = ((x_t - np.sqrt(1 - abar) * out) / np.sqrt(abar) if prediction == "epsilon" else
            np.sqrt(abar) * x_t - np.sqrt(1 - abar) * out)
  c = lambda k: q[k][t][:, None, None, None]
  m_true, m = c("x0") * x0 + c("xt") * x_t, c("x0") * x0_hat + c("xt") * x_t
  s_true = np.exp(0.5 * c("logvar"))
  s = np.exp(0.5 * np.asarray(ddpm.model_log_variance(cfg, jnp.asarray(t), v), np.float64))
  kl = np.log(s / s_true) + (s_true ** 2 + (m_true - m) ** 2) / (2 * s ** 2) - 0.5
  bins = np.clip(stats.norm.cdf(x0 + 1 / 255, m, s), 0, 1) - np.clip(stats.norm.cdf(x0 - 1 / 255, m, s), 0, 1)
  bins = np.where(x0 > 0.999, 1 - stats.norm.cdf(x0 - 1 / 255, m, s), bins)
  bins = np.where(x0 < -0.999, stats.norm.cdf(x0 + 1 / 255, m, s), bins)
  nll = -np.log(np.maximum(bins, 1e-12))
  per = lambda a: a.reshape(3, -1).mean(1) / np.log(2)
  np.testing.assert_allclose(got[1:], per(kl)[1:], rtol=1e-4)
  np.testing.assert_allclose(got[0], per(nll)[0], rtol=2e-2)  # guided-diffusion's tanh approximation of the cdf
  # the true variance and mean cost nothing
  exact = np.asarray(ddpm.variational_bound(cfg, x0, x_t, jnp.asarray(t), np.asarray(
      (x_t - np.sqrt(abar) * x0) / np.sqrt(1 - abar) if prediction == "epsilon" else
      (np.sqrt(abar) * x_t - x0) / np.sqrt(1 - abar), np.float32), -np.ones_like(v)))
  np.testing.assert_allclose(exact[1:], 0.0, atol=1e-5)


def test_the_bound_teaches_the_variance_channels_only():
  cfg = _section()
  x0 = jnp.asarray(np.random.default_rng(2).standard_normal((4, 4, 4, 2)), jnp.float32)
  draws = {"t": jnp.array([0.0, 5.0, 300.0, 999.0]), "eps": jnp.asarray(np.random.default_rng(3).standard_normal(
      x0.shape), jnp.float32)}
  out = jnp.asarray(np.random.default_rng(4).standard_normal((4, 4, 4, 4)) * 0.5, jnp.float32)
  grad = lambda variance: jax.grad(lambda o: ddpm.DDPM(cfg, variance).loss(lambda x, t: o, x0, draws).sum())(out)
  learned = grad(True)
  plain = jax.grad(lambda o: ddpm.DDPM(cfg).loss(lambda x, t: o[..., :2], x0, draws).sum())(out)
  np.testing.assert_allclose(learned[..., :2], plain[..., :2], rtol=1e-6)  # the noise's gradient: the MSE's alone
  assert np.abs(np.asarray(learned[..., 2:])).min(axis=(1, 2, 3)).max() > 0 and np.all(plain[..., 2:] == 0)
  # sampling steps with the noise half only
  sampled = ddpm.DDPM(cfg, True).sample(lambda x, t: jnp.concatenate([0.1 * x, 5 + x], -1), x0, 3, "ddim")
  np.testing.assert_allclose(sampled, ddpm.DDPM(cfg).sample(lambda x, t: 0.1 * x, x0, 3, "ddim"), rtol=1e-6)
