"""Evaluation of a model on its training data's own task (the evaluator `lidit_jax.data.EVALUATORS` names for
`data.source`; the shapes demo's: held-out compositions scored by detecting every object, data/shapes_eval.py).

  python -m lidit_jax.evaluate --workdir runs/shapes --out eval.json   [--config FILE: replaces its config.json]

Writes --out (the metrics JSON) and eval_grid.png / eval_grid.txt beside it, each under a temporary name and
renamed when complete. A previous evaluation's files are replaced; any other existing file of those names is
refused by name before generating (--overwrite replaces it).
"""
from __future__ import annotations

import json
import os
import re

from absl import flags

from lidit_jax import configs, data, distributed, outputs, sample as sample_lib
from lidit_jax.pipeline import Pipeline, Workdir

GRID, GRID_LIST = "eval_grid.png", "eval_grid.txt"


def evaluate(pipe, num_prompts: int, steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
             sampler: str | None = None, batch_size: int = 64, out_dir: str | None = None,
             split: str = "heldout", min_objects: int = 2, num_probe_pairs: int = 0, scene_seed: int = 0,
             max_objects: int = 3, overwrite: bool = True) -> dict:
  """Scores of `pipe` (a `pipeline.Pipeline`; steps, guidance and sampler its defaults unless given) from its
  training data's evaluator (`lidit_jax.data.EVALUATORS`) on `num_prompts` prompts drawn from `scene_seed`. With
  `out_dir`, a grid of the first images and their captions are written there (`overwrite=False`: other files of
  their names are refused)."""
  result, images, lines = data.evaluator(pipe.backend.setup.config.data.source).score(
      pipe, num_prompts, steps, cfg_scale, seed, sampler, batch_size, split, min_objects, num_probe_pairs,
      scene_seed, max_objects)
  d = pipe.defaults
  result.update(split=split, steps=steps or d["num_steps"], cfg=d["guidance"] if cfg_scale is None else cfg_scale,
                sampler=sampler or d["sampler"], seed=seed)
  if out_dir:
    n = min(len(images), 32)
    sample_lib.save_grid(images[:n], os.path.join(out_dir, GRID), cols=8, overwrite=overwrite)
    write_text(os.path.join(out_dir, GRID_LIST), "".join(f"{line}\n" for line in lines[:n]), overwrite,
               is_grid_list, "an evaluation's grid captions")
  return result


def _small_text(path: str) -> str | None:
  """The text of `path` when it is a small UTF-8 file (what our outputs are), else None."""
  try:
    if os.path.getsize(path) > 2 ** 20:
      return None
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, ValueError):
    return None


def is_result(path: str) -> bool:
  """Whether `path` is a previous evaluation's metrics JSON (which a new one may replace)."""
  try:
    obj = json.loads(_small_text(path) or "")
  except ValueError:
    return False
  return isinstance(obj, dict) and {"prompt_accuracy", "split", "checkpoint_step"} <= obj.keys()


def is_grid_list(path: str) -> bool:
  """Whether `path` is a previous eval_grid.txt: lines `NN OK  caption` / `NN BAD caption`."""
  return re.match(r"\d+ (OK |BAD) ", _small_text(path) or "") is not None


def check_outputs(out: str, overwrite: bool = False):
  """Refuse, by name, a file at --out or its grid's paths that a previous evaluation did not write."""
  out_dir = os.path.dirname(os.path.abspath(out))
  for path, ours, what in ((out, is_result, "an evaluation result"),
                           (os.path.join(out_dir, GRID), sample_lib.is_ours, "an image written by lidit_jax"),
                           (os.path.join(out_dir, GRID_LIST), is_grid_list, "an evaluation's grid captions")):
    outputs.preflight(path, overwrite, ours, what)


def write_text(path: str, text: str, overwrite: bool, ours, what: str):
  with outputs.staged(path, overwrite, ours=ours, what=what) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def main(argv):
  distributed.initialize()  # first: several processes (TPU VM workers, GPU nodes) become one runtime
  f = flags.FLAGS
  check_outputs(f.out, f.overwrite)  # before generating: a refused output costs no compute
  out_dir = os.path.dirname(os.path.abspath(f.out))
  if f["config"].value is None:  # the workdir's saved config.json (or a diffusers pipeline folder)
    pipe = Pipeline.from_pretrained(f.workdir, dtype=None)
  else:
    pipe = Pipeline(Workdir.load(f.workdir, None, configs.load_from_flags()))
  config, step = pipe.backend.setup.config, pipe.backend.step
  e = config.eval
  steps = f.steps or e.steps
  cfg = e.cfg if f.cfg is None else f.cfg
  result = evaluate(pipe, f.num_prompts or e.num_prompts, steps, cfg, seed=f.seed, batch_size=e.batch_size,
                    out_dir=out_dir, split=f.split, num_probe_pairs=e.probe_pairs, scene_seed=config.seed,
                    max_objects=max(3, config.data.max_objects), overwrite=f.overwrite)
  result["checkpoint_step"] = step
  write_text(f.out, json.dumps(result, indent=2), f.overwrite, is_result, "an evaluation result")
  print(json.dumps(result, indent=2))
  print(f"wrote {f.out} and {os.path.join(out_dir, GRID)}")


def define_flags():
  configs.define_flags()
  flags.declare_key_flag("config")  # list --config under --help
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ (its config.json is used unless "
                      "--config is given), or anything else Pipeline.from_pretrained reads.", required=True)
  flags.DEFINE_string("out", "eval.json", "Where to write the metrics JSON (a sample grid goes beside it).")
  flags.DEFINE_bool("overwrite", False, "Replace existing files at --out and the grid's paths (a previous "
                    "evaluation's files are replaced without it).")
  flags.DEFINE_integer("num_prompts", None, "Held-out prompts to generate (default: config.eval.num_prompts).",
                       lower_bound=1)
  flags.DEFINE_integer("steps", None, "Sampler steps (default: config.eval.steps).", lower_bound=1)
  flags.DEFINE_float("cfg", None, "Guidance scale (default: config.eval.cfg).")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_enum("split", "heldout", ["heldout", "train"],
                    "Prompts: held-out compositions (2-3 objects), or scenes drawn like the training data (2 to "
                    "data.max_objects objects).")


if __name__ == "__main__":
  from lidit_jax import cli
  define_flags()
  cli.run(main)
