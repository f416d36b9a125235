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
