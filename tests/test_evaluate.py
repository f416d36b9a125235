"""The shapes demo evaluator's prompt sets and its aggregation, on ground-truth renders (no model needed)."""
import numpy as np
import pytest

from lidit_jax.data import shapes, shapes_eval


def test_eval_splits():
  held = shapes_eval.eval_scenes("heldout", 100, seed=0)
  seen = shapes_eval.eval_scenes("train", 100, seed=0)
  assert all(shapes.is_heldout(s) for s in held) and not any(shapes.is_heldout(s) for s in seen)
  assert all(len(s.objects) >= 2 for s in held + seen)
  with pytest.raises(ValueError, match="use 'heldout' or 'train'"):
    shapes_eval.eval_scenes("test", 1, 0)


def test_summary_on_ground_truth_and_on_wrong_images():
  scenes = shapes_eval.eval_scenes("heldout", 40, seed=1)
  rng = np.random.default_rng(0)
  renders = [shapes.render(s, rng) for s in scenes]
  perfect = shapes_eval.summarize(scenes, [shapes.score(s, shapes.detect(r)) for s, r in zip(scenes, renders)])
  assert perfect["prompt_accuracy"] == 1.0 and perfect["relation_accuracy"] == 1.0
  assert perfect["object_accuracy_first_phrase"] == perfect["object_accuracy_last_phrase"] == 1.0
  # Score each scene against the render of another scene: accuracies must drop.
  shifted = [shapes.score(s, shapes.detect(r)) for s, r in zip(scenes, renders[1:] + renders[:1])]
  wrong = shapes_eval.summarize(scenes, shifted)
  assert wrong["prompt_accuracy"] < 0.2 and wrong["colour_accuracy"] < 0.9
  assert set(wrong["prompt_accuracy_by_num_objects"]) == {"2", "3"}
  assert len(wrong["object_accuracy_by_phrase_index"]) == 3


def test_relative_position_bins_on_long_prompts():
  """Prompts of 2 to 6 phrases (data.max_objects=6): phrase k of n scores in quarter int(4 k / (n - 1))."""
  scenes = shapes_eval.eval_scenes("train", 60, seed=3, max_objects=6)
  assert {len(s.objects) for s in scenes} == {2, 3, 4, 5, 6}
  rng = np.random.default_rng(0)
  scores = [shapes.score(s, shapes.detect(shapes.render(s, rng))) for s in scenes]
  assert shapes_eval.summarize(scenes, scores)["object_accuracy_by_relative_position"] == [1.0] * 4
  # Only the last phrase of each prompt wrong: the last quarter holds the last phrases, the 4th of five, the 5th of
  # six.
  for sc in scores:
    sc["object"][-1] = False
  by_pos = shapes_eval.summarize(scenes, scores)["object_accuracy_by_relative_position"]
  right = sum(len(s.objects) in (5, 6) for s in scenes)
  assert by_pos[:3] == [1.0] * 3 and by_pos[3] == pytest.approx(right / (len(scenes) + right))
