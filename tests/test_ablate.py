"""The ablation study's command, end to end on the tiny config: two variants on random towers over two seeds, and
the issue-17 groups on tiny pretrained towers (a few steps each)."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from lidit_jax.cli import UserError
from lidit_jax.experiments import ablate


def test_difference_is_starred_only_beyond_both_spreads():
  assert ablate.versus((0.50, 0.01, 2), (0.40, 0.02, 2)) == "+0.100 *"
  assert ablate.versus((0.40, 0.06, 3), (0.50, 0.05, 3)) == "-0.100"  # within 0.06 + 0.05
  assert ablate.versus((0.50, 0.00, 1), (0.40, 0.00, 1)) == "+0.100"  # one seed has no spread to exceed
  runs = {"pos_lm": {s: {**{m: 0.5 for m in ablate.METRICS}, "object_accuracy_by_phrase_index": [0.5] * 3,
                         "object_accuracy_by_relative_position": [0.6 - 0.1 * s, 0.5, 0.5, 0.4]} for s in (0, 1)}}
  assert ablate.aggregate(runs)["pos_lm"]["position_decay"] == pytest.approx((0.15, 0.05, 2))


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
  assert "Cost: 4 timed runs" in md and "CPU-hours" in md
  assert "| object vs baseline | seeds |" in md and "| (reference) | 2 |" in md
  d = agg["refiner_depth_0"]["object_accuracy"][0] - agg["baseline"]["object_accuracy"][0]
  assert f"| {d:+.3f}" in md.split("\n| refiner_depth_0 |")[1].splitlines()[0]
  rows = [line for line in md.splitlines() if line.startswith("|")]
  assert len(rows) == 4 and len({line.count("|") for line in rows}) == 1  # header, rule, 2 variants: aligned
  img = np.asarray(Image.open(tmp_path / "position.png"))
  assert img.ndim == 3 and img.shape[0] > 200 and img.std() > 0
  # A second call reuses the finished runs (no retraining) and gives the same numbers.
  again = ablate.ablate(str(tmp_path), base, ["baseline", "refiner_depth_0"], seeds=[0, 1], steps=2, num_prompts=4)
  assert json.dumps(again) == json.dumps(agg)  # (NaN: the empty 25-50 % quarter of three-phrase prompts)
  # Finished runs of another config are refused, not silently reused (e.g. the demo changed since).
  with pytest.raises(UserError, match="finished run of another config"):
    ablate.ablate(str(tmp_path), base, ["baseline"], seeds=[0], steps=3, num_prompts=4)
  with pytest.raises(ValueError, match="unknown variant"):
    ablate.ablate(str(tmp_path), base, ["nope"], seeds=[0], steps=2, num_prompts=4)


@pytest.mark.slow
def test_study_groups_on_pretrained_towers(tmp_path, monkeypatch):
  """The issue-17 groups end to end on tiny pretrained towers (made by the command, quick): LI-DiT, a conditioner
  (the CAM, T5 in CLIP's place, on the U-Net over 4 x 4 pixel patches) and a positional-bias variant trained and
  scored on prompts of 2 to 6 phrases."""
  pytest.importorskip("torch")
  from lidit_jax.experiments import pretrain_towers
  monkeypatch.chdir(tmp_path)  # configs/shapes.py:pretrained reads checkpoints/pretrained/
  assert pretrain_towers.main(["--out", "checkpoints/pretrained", "--quick"]) == 0
  base = str(ROOT / "configs" / "shapes.py") + ":tiny"
  names = ["lidit", "unet_cam", "pos_t5_refiner"]
  agg = ablate.ablate("study", base, names, seeds=[0], steps=2, num_prompts=10)
  cfg = lambda v: json.load(open(tmp_path / "study" / v / "seed_0" / "config.json"))
  assert cfg("lidit")["text"]["towers"]["llama_a"]["init"] == "checkpoints/pretrained/lm_instruct"
  assert cfg("lidit")["text"]["use"] == "llama_a,llama_b" and cfg("lidit")["conditioner"]["kind"] == "refiners"
  cam = cfg("unet_cam")
  assert (cam["text"]["use"], cam["conditioner"]["kind"], cam["conditioner"]["cam"]["clip"]) == \
      ("t5,llama_a", "llm4gen", "t5")
  assert (cam["model"]["family"], cam["autoencoder"]["kind"]) == ("unet", "patches")
  pos = cfg("pos_t5_refiner")
  assert pos["data"]["max_objects"] == 6 and pos["text"]["use"] == "t5" and pos["model"]["refiner"]["depth"] == 1
  counts = json.load(open(tmp_path / "study" / "pos_t5_refiner" / "seed_0" / "eval.json"))
  assert set(counts["prompt_accuracy_by_num_objects"]) == {"2", "3", "4", "5", "6"}  # long prompts, scored
  assert len(agg["pos_t5_refiner"]["object_accuracy_by_relative_position"][0]) == 4
  assert len(agg["pos_t5_refiner"]["object_accuracy_by_phrase_index"][0]) == 6
  md = (tmp_path / "study" / "ablation.md").read_text()
  assert [line for line in md.splitlines() if line.startswith("## ")] == ["## lidit", "## conditioners", "## position"]
  assert md.count("\n| lidit |") == 2 and "phrases at 75-100 %" in md  # LI-DiT is a row of both its groups
  img = np.asarray(Image.open(tmp_path / "study" / "position.png"))
  assert img.shape[1] > 2.5 * img.shape[0]  # one panel per group
