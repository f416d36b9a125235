"""`train.eval_every`: the held-out loss at fixed draws, the same after a resume and on 1 or 8 devices."""
import json

import jax
import numpy as np
import pytest

from lidit_jax import configs, train
from lidit_jax.data import pipeline

from conftest import ROOT, one_and_eight_device_losses, tiny_config, train_preempted


def val_losses(workdir) -> list[tuple[int, float]]:
  lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return [(line["step"], line["val_loss"]) for line in lines if "val_loss" in line]


def test_validation_loss_is_the_same_after_a_resume(tmp_path, monkeypatch):
  config = tiny_config(**{"train.eval_every": 2})  # tiny: 6 steps, a checkpoint every 3
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  # calls 1-2 of ShapesBatches.__next__ read the held-out batches; call 7 is step 5's batch
  left = train_preempted(config, str(tmp_path / "resumed"), monkeypatch, pipeline.ShapesBatches, at_batch=2 + 5)
  assert left == [3]
  whole, resumed = val_losses(tmp_path / "whole"), val_losses(tmp_path / "resumed")
  assert [step for step, _ in whole] == [2, 4, 6]
  assert resumed == whole  # bit for bit: steps 4 and 6 were evaluated by the resumed run
  assert whole[0][1] != whole[2][1]  # it measures the weights


def test_validation_needs_a_held_out_split():
  c = tiny_config()
  with pytest.raises(ValueError, match="data.eval_split"):
    configs.validate(configs.apply_overrides(c, {"data.source": "tfds", "train.eval_every": 10}))
  with pytest.raises(ValueError, match="train.eval_batches"):
    configs.validate(configs.apply_overrides(c, {"train.eval_batches": 0}))


@pytest.mark.slow  # two training processes (~90 s): run with -m slow
def test_validation_loss_on_one_and_eight_devices(tmp_path):
  flags = ["--config.train.num_steps=2", "--config.train.batch_size=8", "--config.train.eval_every=1",
           "--config.train.sample_every=100", "--config.train.checkpoint_every=100"]
  losses = one_and_eight_device_losses(f"{ROOT / 'configs' / 'shapes.py'}:tiny", flags,
                                       ["--config.mesh.data=4", "--config.mesh.fsdp=2"], tmp_path, key="val_loss")
  assert len(losses["one"]) == 2
  np.testing.assert_allclose(losses["eight"], losses["one"], rtol=2e-6)  # float32 reduction order only


def random_fid_weights(path) -> str:
  """Random FID Inception weights in pytorch-fid's released naming (positive variances), as a .safetensors file."""
  from safetensors.numpy import save_file
  from lidit_jax.convert import fid_inception, safetensors_io as io
  expected = io.flatten_shapes(io.strip_boxes(fid_inception.abstract_params(fid_inception.make_module())))
  rng = np.random.default_rng(0)
  params = {}
  for key, leaf in expected.items():
    fan_in = int(np.prod(leaf.shape[:-1])) if key[-1] == "kernel" else 1
    value = rng.normal(0, (2 / fan_in) ** 0.5, leaf.shape) if key[-1] == "kernel" else rng.uniform(0.5, 1.5, leaf.shape)
    params[key] = value.astype(np.float32)
  tree = {}
  for key, value in params.items():  # nested, as flatten_shapes reads it
    node = tree
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = value
  save_file(io.to_state_dict(fid_inception.plan(expected), tree), str(path))
  return str(path)


def test_fid_and_clip_score_during_training(tmp_path):
  """The logged FID and CLIP score are those of the EMA weights' images for the first held-out captions, at the
  fixed noise, computed again here by hand from the saved checkpoint."""
  from lidit_jax import sample
  from lidit_jax.metrics import clip_score, fid
  from lidit_jax.pipeline import Pipeline
  from test_clip_score import save_tiny_clip
  weights, clip = random_fid_weights(tmp_path / "inception.safetensors"), save_tiny_clip(tmp_path / "clip")
  n = 6
  config = tiny_config(**{"train.num_steps": 2, "train.eval_every": 2, "eval.fid_inception": weights,
                          "eval.clip": clip, "eval.metric_images": n, "eval.steps": 2, "eval.batch_size": 4})
  train.train_and_evaluate(config, str(tmp_path / "run"))
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if "val_loss" in line][-1]
  held = pipeline.held_out(config, text_for=lambda captions: {})
  batches = [next(held) for _ in range(config.train.eval_batches)]
  captions = [c for b in batches for c in b["caption"]][:n]
  pipe = Pipeline.from_pretrained(str(tmp_path / "run"))
  noise = pipe.noise([jax.random.fold_in(jax.random.key(0), i) for i in range(n)])
  images = sample.to_uint8(pipe(captions, num_steps=2, guidance=config.eval.cfg, latents=noise))
  np.testing.assert_allclose(logged["clip_score"], clip_score.CLIPScore(clip)(images, captions), rtol=1e-5)
  features = fid.FeatureExtractor(weights, batch_size=4)
  real = np.concatenate([b["image"] for b in batches]).astype(np.float32) / 255
  mine, theirs = (features.many(x) for x in (images.astype(np.float32) / 255, real))
  np.testing.assert_allclose(logged["fid"], fid.frechet_distance_from_features(mine, *fid.statistics(theirs)),
                             rtol=1e-4)
  assert np.isfinite(logged["fid"]) and logged["fid"] > 0
