"""lidit_jax.autoencoder: the latent scale of diffusers' pipelines, posterior sampling, and the config checks."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lidit_jax import autoencoder, configs
from lidit_jax.convert import tiny_models

SCALES = {  # the three conventions of diffusers' pipelines
    "sd": dict(scaling_factor=0.18215),
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
    "latents_mean_std": dict(scaling_factor=0.5, latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 2.0, 0.5, 1.0)),
}


def _section(**kw):
  return ml_collections.ConfigDict({**dict(kind="vae", path="", factor=2, channels=4), **kw})


@pytest.mark.parametrize("scale", list(SCALES))
def test_vae_latents_use_the_pipelines_scale(tmp_path, scale):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  path = tiny_models.write_tiny_vae(str(tmp_path / "vae"), seed=1, **SCALES[scale])
  ae, params = autoencoder.build(_section(path=path))
  ref = diffusers.AutoencoderKL.from_pretrained(path).double()
  c = ref.config
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  lat = np.asarray(ae.encode(params, jnp.asarray(x)))
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64)).permute(0, 3, 1, 2)
  with torch.no_grad():
    z = ref.encode(t(x)).latent_dist.mean
    if c.latents_mean is not None:  # SDXL-style pipelines (e.g. Playground v2.5)
      mean, std = (torch.tensor(v, dtype=z.dtype).view(1, -1, 1, 1) for v in (c.latents_mean, c.latents_std))
      want_lat, unscaled = (z - mean) * c.scaling_factor / std, lambda l: l * std / c.scaling_factor + mean
    else:  # SD (shift None) and SD3 / Flux
      shift = c.shift_factor or 0.0
      want_lat, unscaled = (z - shift) * c.scaling_factor, lambda l: l / c.scaling_factor + shift
    want_img = ref.decode(unscaled(t(lat))).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(lat, want_lat.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(ae.decode(params, jnp.asarray(lat))), want_img, atol=1e-4, rtol=1e-4)


def test_posterior_samples_have_the_posterior_std(tmp_path):
  path = tiny_models.write_tiny_vae(str(tmp_path / "vae"), seed=2)
  ae, params = autoencoder.build(_section(path=path))
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32))
  mean, logvar = ae.module.apply({"params": params}, x, method="moments")
  draws = jax.jit(jax.vmap(lambda k: ae.encode(params, x, k)))(jax.random.split(jax.random.key(0), 200))
  std = jnp.exp(0.5 * logvar) * ae.module.cfg.scaling_factor
  z_score = np.asarray((draws.mean(0) - ae.encode(params, x)) / (std / np.sqrt(len(draws))))
  assert np.abs(z_score).max() < 5, np.abs(z_score).max()  # centred on the (scaled) posterior mean
  ratio = np.asarray(draws.std(0) / std)
  assert abs(np.median(ratio) - 1) < 0.05, np.median(ratio)  # a sample, not the mean (ratio 0) or twice the noise


def test_identity_and_config_refusals(tmp_path):
  ae, params = autoencoder.build(ml_collections.ConfigDict(dict(kind="identity", factor=1, channels=3)))
  x = jnp.ones((1, 4, 4, 3))
  assert params is None and ae.encode(None, x) is x and ae.decode(None, x) is x
  with pytest.raises(configs.ConfigError, match="needs autoencoder.path"):
    autoencoder.build(_section())
  path = tiny_models.write_tiny_vae(str(tmp_path / "vae"))
  with pytest.raises(configs.ConfigError, match=r"has \(2, 4\). Fix: --config.autoencoder.factor=2"):
    autoencoder.build(_section(path=path, factor=8))
