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


def test_patches_are_pixels_rearranged():
  """autoencoder.kind=patches: position (i, j) holds pixel block (4i.., 4j..) row-major, colour last; lossless."""
  ae, params = autoencoder.build(ml_collections.ConfigDict(dict(kind="patches", factor=4, channels=48)))
  x = jax.random.normal(jax.random.key(0), (2, 32, 16, 3))
  z = ae.encode(params, x)
  assert z.shape == (2, 8, 4, 48) and ae.channels == ae.stored_channels == 48
  np.testing.assert_array_equal(z[1, 2, 3].reshape(4, 4, 3), x[1, 8:12, 12:16])
  np.testing.assert_array_equal(ae.decode(params, z), x)
  c = configs.base_config()
  c.autoencoder.update(kind="patches", factor=4, channels=12)
  with pytest.raises(configs.ConfigError, match="channels=48"):
    configs.validate(c)


@pytest.mark.parametrize("attention,channels", [(True, (8, 16)), (False, (32, 64))])
def test_vae_encode_peak_estimate_matches_what_xla_allocates(attention, channels):
  """The planner's encoding estimate against the compiled encoder's temporary bytes (CPU): the mid block's
  attention dominates a small VAE at 64 px, full-resolution feature maps one without it."""
  from lidit_jax.convert import diffusers_vae, registry
  from lidit_jax.models import vae
  cfg = vae.VAEConfig(**{**tiny_models.TINY_VAE, "block_out_channels": channels, "norm_num_groups": 8,
                         "mid_block_add_attention": attention})
  ae = autoencoder.VAE(vae.AutoencoderKL(cfg))
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                        registry.strip_boxes(diffusers_vae.abstract_params(ae.module)))
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  compiled = jax.jit(ae.encode).lower(params, images).compile()
  allocated = compiled.memory_analysis().temp_size_in_bytes
  assert ae.encode_peak_bytes(2, (64, 64)) == pytest.approx(allocated, rel=0.05)
  # XLA's FLOP count of one image against ours: 2 k^2 Cin Cout per output pixel of every conv (conv_in, the
  # resnets, the downsample, the shortcut, conv_out, quant_conv) plus the mid block's attention
  c0, c1 = channels
  full, low = 64 * 64, 32 * 32
  conv = lambda k, cin, cout, pixels: 2 * k * k * cin * cout * pixels
  want = (conv(3, 3, c0, full) + 2 * conv(3, c0, c0, full) + conv(3, c0, c0, low) + conv(3, c0, c1, low)
          + conv(1, c0, c1, low) + 5 * conv(3, c1, c1, low) + conv(3, c1, 8, low) + conv(1, 8, 8, low))
  if attention:
    want += 4 * 2 * c1 * c1 * low + 4 * low * low * c1
  assert ae.encode_flops(params, (64, 64)) == pytest.approx(want, rel=0.1)  # measured 1.057 and 0.980

def test_plan_counts_the_frozen_vae(tmp_path):
  """`plan` with a VAE: its parameters (replicated), the encoding peak and FLOPs when the step encodes images,
  none of that on precomputed latents, and a plan before the VAE exists says what it leaves out."""
  from conftest import ROOT
  from lidit_jax import plan
  vae_dir = tiny_models.write_tiny_vae(str(tmp_path / "vae"), seed=0)
  base = configs.load_config_file(str(ROOT / "configs" / "lidit_1b.py") + ":tiny")

  def planned(**overrides):
    c = configs.apply_overrides(base.copy_and_resolve_references(), {
        "autoencoder.path": vae_dir, "data.source": "tfds", "data.name": "pics", "data.data_dir": str(tmp_path),
        "data.image_size": 64, "train.batch_size": 8, "mesh.data": 2, "mesh.fsdp": 2, **overrides})
    return plan.plan(configs.validate(c), 4, chip="v5p")

  ae, params = autoencoder.build(_section(path=vae_dir))
  p = planned()
  b = p["bytes_per_device"]
  assert b["autoencoder"] == sum(a.size * 4 for a in jax.tree.leaves(params))  # float32, on every device
  assert b["autoencoder_activations_estimate"] == ae.encode_peak_bytes(2, (64, 64))  # 8 images on 2 x 2
  assert p["autoencoder_tflop_per_step"] * 1e12 == pytest.approx(8 * ae.encode_flops(params, (64, 64)))
  assert p["autoencoder_planned"] and b["total"] == sum(v for k, v in b.items() if k != "total")
  assert "of the autoencoder" in plan.format_plan(p)
  # precomputed latents: the step never encodes, the VAE stays resident only for decoding samples
  lat = planned(**{"data.source": "features"})
  assert lat["bytes_per_device"]["autoencoder"] == b["autoencoder"]
  assert lat["bytes_per_device"]["autoencoder_activations_estimate"] == 0 and lat["autoencoder_tflop_per_step"] == 0
  assert lat["step_seconds_at_mfu"] < p["step_seconds_at_mfu"]
  missing = planned(**{"autoencoder.path": str(tmp_path / "not_converted_yet")})
  assert not missing["autoencoder_planned"] and missing["bytes_per_device"]["autoencoder"] == 0
  assert "not planned (no VAE at autoencoder.path yet)" in plan.format_plan(missing)
