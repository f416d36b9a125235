"""The contract every plugin combination meets through the shared trainer, `Pipeline` and exporter: it trains,
is preempted and resumes on an uninterrupted run's losses, samples from its workdir, and exports. Six
combinations (tests/contract.py: RUNS); every one of the 60 builds in tests/test_contract_build.py."""
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from lidit_jax import export, train
from lidit_jax.data import pipeline
from lidit_jax.pipeline import Pipeline

from conftest import train_preempted
from contract import RUNS, combo_id, config_for, vae  # noqa: F401  (vae: a fixture)

SHORT = {"train.num_steps": 3, "train.log_every": 1, "train.checkpoint_every": 1, "train.sample_every": 100,
         "optim.warmup_steps": 1}


def losses(workdir) -> dict:
  return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))}


@pytest.mark.parametrize("combo", RUNS, ids=combo_id)
def test_trains_resumes_samples_and_exports(combo, vae, tmp_path, monkeypatch):
  config = config_for(*combo, vae=vae, **SHORT)
  train.train_and_evaluate(config, str(tmp_path / "reference"))
  left = train_preempted(config, str(tmp_path / "resumed"), monkeypatch, pipeline.ShapesBatches, at_batch=3)
  assert left and max(left) < 3  # the restart resumed from a checkpoint, not from nothing or the end
  want, got = losses(tmp_path / "reference"), losses(tmp_path / "resumed")
  assert list(got) == list(want) == [1, 2, 3] and np.isfinite(list(want.values())).all()
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, got, want)

  pipe = Pipeline.from_pretrained(str(tmp_path / "resumed"))
  images = pipe(["a red circle", "a blue square above a green triangle"], num_steps=2, seed=1)
  assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all() and images.std() > 0

  # Every trained parameter leaves in PyTorch layouts (transposed / reshaped: the same values, none lost).
  exported = load_file(export.export_safetensors(str(tmp_path / "resumed"), str(tmp_path / "model.safetensors")))
  params = jax.tree.leaves(pipe.backend.params["model"])
  assert sum(a.size for a in exported.values()) == sum(a.size for a in params)
  squares = lambda arrays: sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in arrays)
  assert squares(exported.values()) == pytest.approx(squares(params), rel=1e-6)
  for path, kernel in jax.tree_util.tree_flatten_with_path(pipe.backend.params["model"])[0]:
    keys = [k.key for k in path]
    if keys[-1] == "kernel" and kernel.ndim == 2:  # a Linear's weight is [out, in], whatever its logical axes
      assert exported[".".join(keys[:-1]) + ".weight"].shape == kernel.shape[::-1], keys
