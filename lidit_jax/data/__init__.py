"""Training data sources (`data.source`: shapes, tfds, features; data/pipeline.py reads them) and the evaluators
that score a model on a source's own task (`python -m lidit_jax.evaluate`). An evaluator module has
  score(pipe, num_prompts, steps, cfg_scale, seed, sampler, batch_size, split, min_objects, num_probe_pairs,
        scene_seed, max_objects) -> (metrics dict, images [N, H, W, 3] uint8, one caption line per image)
"""
from __future__ import annotations

import importlib
from types import ModuleType

from lidit_jax.cli import UserError

EVALUATORS = {"shapes": "lidit_jax.data.shapes_eval"}


def evaluator(source: str) -> ModuleType:
  if source not in EVALUATORS:
    raise UserError(f"data.source={source!r} has no evaluator (those with one: {sorted(EVALUATORS)}). Fix: "
                    "evaluate a model of the shapes demo, or score your images with your benchmark's own tools")
  return importlib.import_module(EVALUATORS[source])
