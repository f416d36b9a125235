"""`train.eval_every`: the held-out loss at fixed draws, the same after a resume and on 1 or 8 devices."""
import json

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
