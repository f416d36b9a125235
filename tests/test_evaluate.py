"""The evaluation's prompt sets and its aggregation, on ground-truth renders (no model needed)."""
import numpy as np
import pytest

from lidit_jax import evaluate
from lidit_jax.data import shapes


def test_eval_splits():
  held = evaluate.eval_scenes("heldout", 100, seed=0)
  seen = evaluate.eval_scenes("train", 100, seed=0)
  assert all(shapes.is_heldout(s) for s in held) and not any(shapes.is_heldout(s) for s in seen)
  assert all(len(s.objects) >= 2 for s in held + seen)
  with pytest.raises(ValueError, match="use 'heldout' or 'train'"):
    evaluate.eval_scenes("test", 1, 0)


def test_summary_on_ground_truth_and_on_wrong_images():
  scenes = evaluate.eval_scenes("heldout", 40, seed=1)
  rng = np.random.default_rng(0)
  renders = [shapes.render(s, rng) for s in scenes]
  perfect = evaluate.summarize(scenes, [shapes.score(s, shapes.detect(r)) for s, r in zip(scenes, renders)])
  assert perfect["prompt_accuracy"] == 1.0 and perfect["relation_accuracy"] == 1.0
  assert perfect["object_accuracy_first_phrase"] == perfect["object_accuracy_last_phrase"] == 1.0
  # Score each scene against the render of another scene: accuracies must drop.
  shifted = [shapes.score(s, shapes.detect(r)) for s, r in zip(scenes, renders[1:] + renders[:1])]
  wrong = evaluate.summarize(scenes, shifted)
  assert wrong["prompt_accuracy"] < 0.2 and wrong["colour_accuracy"] < 0.9
  assert set(wrong["prompt_accuracy_by_num_objects"]) == {"2", "3"}
  assert len(wrong["object_accuracy_by_phrase_index"]) == 3


def test_relative_position_bins_on_long_prompts():
  """Prompts of 2 to 6 phrases (data.max_objects=6): phrase k of n scores in quarter int(4 k / (n - 1))."""
  scenes = evaluate.eval_scenes("train", 60, seed=3, max_objects=6)
  assert {len(s.objects) for s in scenes} == {2, 3, 4, 5, 6}
  rng = np.random.default_rng(0)
  scores = [shapes.score(s, shapes.detect(shapes.render(s, rng))) for s in scenes]
  assert evaluate.summarize(scenes, scores)["object_accuracy_by_relative_position"] == [1.0] * 4
  # Only the last phrase of each prompt wrong: the last quarter holds the last phrases, the 4th of five, the 5th of
  # six.
  for sc in scores:
    sc["object"][-1] = False
  by_pos = evaluate.summarize(scenes, scores)["object_accuracy_by_relative_position"]
  right = sum(len(s.objects) in (5, 6) for s in scenes)
  assert by_pos[:3] == [1.0] * 3 and by_pos[3] == pytest.approx(right / (len(scenes) + right))


def test_independent_check_reads_grids_and_agrees_on_ground_truth(tmp_path):
  """benchmarks/independent_check.py: its own caption reader and detector score the renderer's images 1.0 (as the
  evaluator does, from the grid PNG the evaluator writes) and images of other prompts far lower."""
  from benchmarks import independent_check as ic
  from lidit_jax import sample
  scenes = evaluate.eval_scenes("heldout", 40, seed=2)
  captions = [s.caption(k % shapes.N_TEMPLATES) for k, s in enumerate(scenes)]
  assert [ic.parse_caption(c) for c in captions] == [(list(s.objects), list(s.relations)) for s in scenes]
  rng = np.random.default_rng(0)
  renders = np.stack([shapes.render(s, rng) for s in scenes])
  sample.save_grid(renders, str(tmp_path / "eval_grid.png"), cols=8)
  (tmp_path / "eval_grid.txt").write_text("".join(f"{k:02d} OK  {c}\n" for k, c in enumerate(captions)))
  tiles, read = ic.read_grid(str(tmp_path / "eval_grid.png"), str(tmp_path / "eval_grid.txt"))
  assert read == captions and np.array_equal(tiles, renders)
  both = ic.compare([str(tmp_path / "eval_grid.png")])
  assert both["independent"] == both["evaluator"] == {"images": 40, "colour": 1.0, "shape": 1.0, "relation": 1.0,
                                                      "count": 1.0}
  wrong = ic.summarize([ic.check(r, c) for r, c in zip(renders, captions[1:] + captions[:1])])
  assert wrong["shape"] < 0.5 and wrong["relation"] < 0.5 and wrong["colour"] < 0.8
