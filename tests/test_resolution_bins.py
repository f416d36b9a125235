"""Resolution binning against diffusers' tables and its resize-and-crop; cfg_trunc's threshold against
Lumina2Pipeline's rule."""
import numpy as np
import pytest

from lidit_jax import resolution_bins
from lidit_jax.objectives import guidance

from conftest import tiny_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _diffusers_tables():
  from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha
  from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma
  from diffusers.pipelines.sana import pipeline_sana as sana
  return {256: alpha.ASPECT_RATIO_256_BIN, 512: alpha.ASPECT_RATIO_512_BIN, 1024: alpha.ASPECT_RATIO_1024_BIN,
          2048: sigma.ASPECT_RATIO_2048_BIN, 4096: sana.ASPECT_RATIO_4096_BIN}


@pytest.mark.parametrize("base", resolution_bins.SIZES)
def test_tables_and_nearest_bins_are_diffusers(base):
  theirs = _diffusers_tables()[base]
  assert resolution_bins.table(base) == [(float(k), int(h), int(w)) for k, (h, w) in theirs.items()]
  classify = diffusers.image_processor.PixArtImageProcessor.classify_height_width_bin
  sizes = np.random.default_rng(base).integers(16, 4 * base, size=(300, 2))
  for h, w in [*sizes.tolist(), (base, base), (100, 400), (1, 4096)]:
    assert resolution_bins.nearest(h, w, base) == classify(h, w, ratios=theirs), (h, w)


def test_unknown_base_is_refused_with_the_sizes():
  with pytest.raises(ValueError, match="1000.*256, 512, 1024, 2048, 4096"):
    resolution_bins.table(1000)


@pytest.mark.parametrize("size", [(20, 30), (7, 13), (40, 24), (16, 16)])
def test_resize_and_crop_is_diffusers(size):
  images = np.random.default_rng(0).standard_normal((2, 16, 24, 3)).astype(np.float32)
  want = diffusers.image_processor.PixArtImageProcessor.resize_and_crop_tensor(
      torch.from_numpy(images.transpose(0, 3, 1, 2)), size[1], size[0]).numpy().transpose(0, 2, 3, 1)
  ours = np.asarray(resolution_bins.resize_and_crop(images, *size))
  assert ours.shape == want.shape == (2, *size, 3)
  np.testing.assert_allclose(ours, want, atol=1e-5)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99, 1.0])
def test_truncation_time_guides_the_steps_lumina2_guides(fraction):
  times = np.sort(np.random.default_rng(1).uniform(0, 1, 8))[::-1]
  above = guidance.truncation_time(times, fraction)
  guided = [(i + 1) / len(times) <= fraction for i in range(len(times))]  # Lumina2Pipeline's rule
  assert [above is None or t > above for t in times] == guided


@pytest.mark.parametrize("overrides, match", [
    ({"sample.cfg_trunc": 1.5}, r"sample.cfg_trunc.*1.5.*in \[0, 1\]"),
    ({"sample.resolution_bins": 300}, r"sample.resolution_bins.*300.*256, 512"),
    ({"objective.kind": "ddpm", "sample.sampler": "ddim", "sample.cfg_trunc": 0.5}, r"sample.cfg_trunc.*flow models")])
def test_bad_sample_settings_are_refused_by_name(overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny_config(**overrides)
