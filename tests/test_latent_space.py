"""LI-DiT in a VAE's latent space (`configs/lidit_1b.py:tiny` on a tiny random VAE): training on a prepared dataset,
with the images encoded in the step or precomputed (`data.latents`), exact resume, and samples decoded to pixels."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lidit_jax import autoencoder, configs, state as state_lib, train
from lidit_jax.pipeline import Pipeline, Workdir
from lidit_jax.convert import tiny_models
from lidit_jax.data import images, latents, pipeline, prepare, shapes

from conftest import ROOT, images_by_hand, train_preempted

TINY_1B = str(ROOT / "configs" / "lidit_1b.py") + ":tiny"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """(tiny VAE folder, TFDS data_dir holding "pics": 12 shapes images of 64 px with their captions)."""
  root = tmp_path_factory.mktemp("latent")
  vae = tiny_models.write_tiny_vae(str(root / "vae"), seed=3)
  src = shapes.ShapesSource(size=64, seed=5)
  os.makedirs(root / "src")
  for i in range(12):
    ex = src.example(i, uint8=True)
    Image.fromarray(ex["image"]).save(root / "src" / f"{i:03d}.png")
    (root / "src" / f"{i:03d}.txt").write_text(ex["caption"], encoding="utf-8")
  prepare.prepare(str(root / "src"), str(root / "tfds"), "pics", shard_size=6, workers=1, progress=False)
  return vae, str(root / "tfds")


def config_for(vae, data_dir, **overrides):
  c = configs.load_config_file(TINY_1B)
  base = {"autoencoder.path": vae, "data.source": "tfds", "data.name": "pics", "data.data_dir": data_dir,
          "train.log_every": 1}
  return configs.validate(configs.apply_overrides(c, {**base, **overrides}))


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_precomputed_latents_hold_the_posterior(world, tmp_path):
  vae, data_dir = world
  c = config_for(vae, data_dir)
  summary = latents.encode(c, str(tmp_path), "pics_latents", batch_size=4, progress=False)
  assert summary["examples"] == 12
  ae, params = autoencoder.build(c.autoencoder)
  lat, _, _ = pipeline.open_dataset(str(tmp_path), "pics_latents")
  img, _, _ = pipeline.open_dataset(data_dir, "pics")
  by_key = {img[i]["key"]: i for i in range(len(img))}
  rec = lat[0]
  z = np.frombuffer(rec["latent"], np.float16).reshape(tuple(rec["shape"])).astype(np.float32)
  assert z.shape == (16, 16, 8)  # [mean | std] of 4 latent channels at a 2x factor
  pixels = images.decode_crop(img[by_key[rec["key"]]]["image"], 32, 32).astype(np.float32) / 127.5 - 1.0
  mean, logvar = ae.module.apply({"params": params}, jnp.asarray(pixels[None]), method="moments")
  scale = ae.module.cfg.scaling_factor
  np.testing.assert_allclose(z[..., :4], np.asarray(mean[0]) * scale, rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(z[..., 4:], np.asarray(np.exp(0.5 * logvar[0])) * scale, rtol=2e-3, atol=1e-4)
  with pytest.raises(ValueError, match="have 8 channels; autoencoder.kind='identity'"):  # pixel config refused
    pipeline.TfdsBatches(configs.apply_overrides(
        configs.load_config_file(str(ROOT / "configs/shapes.py:tiny")),
        {"data.source": "features", "data.name": "pics_latents", "data.data_dir": str(tmp_path)}), None)


@pytest.mark.parametrize("mode", ["encode_in_step", "precomputed"])
def test_latent_training_resumes_exactly(world, tmp_path, monkeypatch, mode):
  vae, data_dir = world
  c = config_for(vae, data_dir)
  if mode == "precomputed":
    latents.encode(c, str(tmp_path / "lat"), "pics_latents", batch_size=4, progress=False)
    c = config_for(vae, str(tmp_path / "lat"), **{"data.source": "features", "data.name": "pics_latents"})
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(c, reference)
  want = losses(reference)
  assert sorted(want) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(v) for v in want.values())
  # Preempted while fetching the 5th batch, after the step-3 checkpoint, and restarted.
  train_preempted(c, str(tmp_path / "resumed"), monkeypatch, pipeline.TfdsBatches, at_batch=5)
  assert os.path.isdir(tmp_path / "resumed" / "checkpoints" / "3")
  got = losses(str(tmp_path / "resumed"))
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (k, got[k], want[k])
  # The step trains on a posterior sample (another key, another sample), not on the posterior mean.
  if mode == "encode_in_step":
    s = state_lib.setup(c)
    ae, params = s.autoencoder, s.frozen["autoencoder"]
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
    a = train.clean_latents(ae, params, x, jax.random.key(0))
    b = train.clean_latents(ae, params, x, jax.random.key(1))
    mean = ae.encode(params, x.astype(jnp.float32) / 127.5 - 1.0)
    assert float(jnp.abs(a - b).max()) > 1e-3 and float(jnp.abs(a - mean).max()) > 1e-3


def test_samples_and_grids_are_decoded_pixels(world, tmp_path):
  vae, data_dir = world
  c = config_for(vae, data_dir, **{"train.num_steps": 2, "train.sample_every": 2, "train.checkpoint_every": 2})
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(c, workdir)
  grid = Image.open(os.path.join(workdir, "samples", "step_0000002.png"))
  n = len(c.sample.prompts)  # rows of num_images tiles of 32 px (pixels, not 16 px latents), 2 px apart, 4x
  assert grid.size == ((2 * 34 + 2) * 4, (n * 34 + 2) * 4) and grid.mode == "RGB"
  s, params, step = state_lib.restore_for_inference(c, workdir)
  noise = np.random.default_rng(0).standard_normal((1, 16, 16, 4)).astype(np.float32)  # latent-shaped
  out = Pipeline(Workdir.of(s, params))(["a red circle"], num_steps=2, guidance=3.0, latents=noise, scheduler="euler")
  assert out.shape == (1, 32, 32, 3)  # pixels: the sampled latents through the VAE decoder, by hand below
  np.testing.assert_allclose(out, images_by_hand(s, params, ["a red circle"], noise, 2, 3.0, "euler"), atol=1e-4)
  r = subprocess.run([sys.executable, "-m", "lidit_jax.sample", "--config", TINY_1B, "--workdir", workdir,
                      f"--config.autoencoder.path={vae}", "--prompt", "a red circle", "--steps", "2",
                      "--out", str(tmp_path / "one.png")], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert Image.open(tmp_path / "one.png").size == (36 * 4, 36 * 4)  # one 32 px image (+ 2 px border), 4x
