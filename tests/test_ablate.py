"""The ablation study's command, end to end on the tiny config (two variants, two seeds, a few steps)."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from lidit_jax.cli import UserError
from lidit_jax.experiments import ablate


@pytest.mark.slow
def test_ablation_table_and_position_plot(tmp_path):
  base = str(ROOT / "configs" / "shapes.py") + ":tiny"
  agg = ablate.ablate(str(tmp_path), base, ["baseline", "refiner_depth_0"], seeds=[0, 1], steps=2, num_prompts=4)
  assert set(agg) == {"baseline", "refiner_depth_0"}
  for a in agg.values():
    mean, std, n = a["object_accuracy"]
    assert n == 2 and 0.0 <= mean <= 1.0 and std >= 0.0
    assert len(a["object_accuracy_by_phrase_index"][0]) == 3  # three-phrase prompts
  results = json.load(open(tmp_path / "results.json"))
  runs = results["runs"]["refiner_depth_0"]
  assert set(runs) == {"0", "1"} and all(r["checkpoint_step"] == 2 for r in runs.values())
  assert not (tmp_path / "baseline" / "seed_0" / "checkpoints").exists()  # evaluated runs keep no checkpoints
  # The variant really changed the model: its config has no refiner blocks, the baseline's has.
  cfg = lambda v: json.load(open(tmp_path / v / "seed_0" / "config.json"))["model"]["refiner"]["depth"]
  assert cfg("refiner_depth_0") == 0 and cfg("baseline") == 1
  md = (tmp_path / "ablation.md").read_text()
  assert md.count("\n| baseline |") == 1 and md.count("\n| refiner_depth_0 |") == 1
  rows = [line for line in md.splitlines() if line.startswith("|")]
  assert len(rows) == 4 and len({line.count("|") for line in rows}) == 1  # header, rule, 2 variants: aligned
  img = np.asarray(Image.open(tmp_path / "position.png"))
  assert img.ndim == 3 and img.shape[0] > 200 and img.std() > 0
  # A second call reuses the finished runs (no retraining) and gives the same numbers.
  again = ablate.ablate(str(tmp_path), base, ["baseline", "refiner_depth_0"], seeds=[0, 1], steps=2, num_prompts=4)
  assert again == agg
  # Finished runs of another config are refused, not silently reused (e.g. the demo changed since).
  with pytest.raises(UserError, match="finished run of another config"):
    ablate.ablate(str(tmp_path), base, ["baseline"], seeds=[0], steps=3, num_prompts=4)
  with pytest.raises(ValueError, match="unknown variant"):
    ablate.ablate(str(tmp_path), base, ["nope"], seeds=[0], steps=2, num_prompts=4)
