"""Prompt-following evaluation on held-out compositions of the shapes demo.

  python -m lidit_jax.evaluate --workdir runs/shapes --out eval.json   [--config FILE: replaces its config.json]

Generates one image per held-out prompt (attribute/relation combinations never seen in training),
detects every object's colour, shape and position programmatically, and reports accuracy per kind
(colour, shape, object = both, relation), whole-prompt accuracy, and object accuracy by the phrase's
position in the prompt (first vs last phrase, and by relative position in quarters: LI-DiT's positional-bias
measure, Figure 3, at toy scale; `--split train` on a model trained with data.max_objects up to 6 scores
prompts of 2 to 6 phrases).

The relation probe (`relation_sensitivity`) asks whether the relation word moves the objects: each probe
pair of objects is drawn from the same noise four times, once per relation word, and the second object's
offset from the first is measured along the relation's axis. A model that follows relations moves the second
object by about an object's width (7-11 px) to the asked side; one that ignores the word leaves it near 0.

Writes --out (the metrics JSON) and eval_grid.png / eval_grid.txt beside it, each under a temporary name and
renamed when complete. A previous evaluation's files are replaced; any other existing file of those names is
refused by name before generating (--overwrite replaces it).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from lidit_jax import outputs, sample as sample_lib
from lidit_jax.data import shapes

GRID, GRID_LIST = "eval_grid.png", "eval_grid.txt"


POSITION_BINS = ("0-25 %", "25-50 %", "50-75 %", "75-100 %")


def summarize(scenes, scores) -> dict:
  """Aggregate per-prompt scores (shapes.score dicts) into accuracies."""
  flat = lambda key: [v for sc in scores for v in sc[key]]
  mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")
  out = {
      "num_prompts": len(scores),
      "colour_accuracy": mean(flat("colour")),
      "shape_accuracy": mean(flat("shape")),
      "object_accuracy": mean(flat("object")),
      "relation_accuracy": mean(flat("relation")),
      "count_accuracy": mean([sc["count"] for sc in scores]),
      "prompt_accuracy": mean([sc["all"] for sc in scores]),
  }
  # Positional bias: is the first-named phrase followed better than the last-named one?
  out["object_accuracy_first_phrase"] = mean([sc["object"][0] for sc in scores])
  out["object_accuracy_last_phrase"] = mean([sc["object"][-1] for sc in scores])
  max_n = max(len(s.objects) for s in scenes)
  # LI-DiT's Figure 3: phrase k of n at relative position k / (n - 1) (first 0, last 1), in quarters.
  bins = [[] for _ in POSITION_BINS]
  for sc in scores:
    n = len(sc["object"])
    for k, ok in enumerate(sc["object"]):
      bins[min(len(bins) - 1, int(len(bins) * k / max(1, n - 1)))].append(ok)
  out["object_accuracy_by_relative_position"] = [mean(b) for b in bins]
  out["object_accuracy_by_phrase_index"] = [
      mean([sc["object"][k] for sc in scores if len(sc["object"]) > k]) for k in range(max_n)]
  out["prompt_accuracy_by_num_objects"] = {
      str(n): mean([sc["all"] for s, sc in zip(scenes, scores) if len(s.objects) == n])
      for n in sorted({len(s.objects) for s in scenes})}
  return out


def eval_scenes(split: str, n: int, seed: int, min_objects: int = 2, max_objects: int = 3) -> list:
  """min_objects..3-object scenes of held-out compositions, or min_objects..max_objects-object scenes drawn like
  the training data, equally many of each count (the gap between the two separates compositional
  generalisation from fitting; 4 to 6 objects: inventories, the positional-bias study's long prompts)."""
  if split == "heldout":
    return shapes.heldout_scenes(n, seed=seed, min_objects=min_objects)
  if split == "train":
    rng = np.random.default_rng([seed, 0x7A1])
    weights = [0.0 if k + 1 < min_objects else 1.0 for k in range(max_objects)]
    return [shapes.sample_scene(rng, "train", max_objects, weights) for _ in range(n)]
  raise ValueError(f"evaluation split {split!r}: use 'heldout' or 'train'")


def probe_pairs(n: int, seed: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
  """`n` pairs of objects of different colours (so each is found by its colour alone)."""
  rng = np.random.default_rng([seed, 0x9B0BE])
  objects = [(c, sh) for c in shapes.COLOURS for sh in shapes.SHAPES]
  pairs = []
  while len(pairs) < n:
    a, b = (objects[k] for k in rng.choice(len(objects), 2, replace=False))
    if a[0] != b[0]:
      pairs.append((a, b))
  return pairs


def _offset(image, a, b):
  """(dx, dy) in pixels of object b's centre from object a's (the largest blob of each one's colour), or None."""
  dets = shapes.detect(image)
  find = lambda obj: next((d for d in dets if d.colour == obj[0]), None)
  da, db = find(a), find(b)
  return None if da is None or db is None else (db.cx - da.cx, db.cy - da.cy)


def relation_probe(pipe, num_pairs: int, steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
                   sampler: str | None = None, batch_size: int = 64, pairs=None, pair_seed: int = 0) -> dict:
  """Same noise, four relation words: the second object's mean offset from the first along each relation's axis
  (x right, y down; "a A to the left of a B" asks for dx > 0), and `relation_sensitivity`, the mean over pairs and
  both axes of half the offset difference between opposite words: about +10 px when relations are followed,
  0 when ignored, negative when reversed. `pairs` replaces the `num_pairs` pairs drawn from `pair_seed`
  ((colour, shape) twice)."""
  pairs = pairs or probe_pairs(num_pairs, pair_seed)
  rels = shapes.RELATIONS
  prompts = [f"a {a[0]} {a[1]} {r} a {b[0]} {b[1]}" for a, b in pairs for r in rels]
  noise_ids = [k for k in range(len(pairs)) for _ in rels]  # one noise per pair, shared by its four prompts
  images = sample_lib.generate_images(pipe, prompts, 1, seed=seed, steps=steps, cfg_scale=cfg_scale,
                                      sampler=sampler, batch_size=batch_size, noise_ids=noise_ids)[:, 0]
  axis = {r: shapes._REL_GEOMETRY[r][0] for r in rels}
  along = {r: [] for r in rels}
  halves = []
  for k, (a, b) in enumerate(pairs):
    off = {r: _offset(images[4 * k + i], a, b) for i, r in enumerate(rels)}
    for r in rels:
      if off[r] is not None:
        along[r].append(off[r][axis[r]])
    for pos, neg in ((rels[0], rels[1]), (rels[2], rels[3])):  # left vs right, above vs below
      if off[pos] is not None and off[neg] is not None:
        halves.append(0.5 * (off[pos][axis[pos]] - off[neg][axis[neg]]))
  mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
  return {"relation_sensitivity": mean(halves), "relation_offsets": {r: mean(v) for r, v in along.items()},
          "relation_probe_pairs": len(pairs), "relation_probe_found": len(halves) / (2 * len(pairs))}


def evaluate(pipe, num_prompts: int, steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
             sampler: str | None = None, batch_size: int = 64, out_dir: str | None = None,
             split: str = "heldout", min_objects: int = 2, num_probe_pairs: int = 0, scene_seed: int = 0,
             max_objects: int = 3, overwrite: bool = True) -> dict:
  """Scores of `pipe` (a `pipeline.Pipeline`; steps, guidance and sampler its defaults unless given) on
  `num_prompts` scenes drawn from `scene_seed` (the relation probe's pairs too). With `out_dir`, the grid and its
  captions are written there (`overwrite=False`: other files of their names are refused)."""
  scenes = eval_scenes(split, num_prompts, scene_seed, min_objects, max_objects)
  captions = [sc.caption(k % shapes.N_TEMPLATES) for k, sc in enumerate(scenes)]
  images = sample_lib.generate_images(pipe, captions, 1, seed=seed, steps=steps, cfg_scale=cfg_scale,
                                      sampler=sampler, batch_size=batch_size)[:, 0]
  scores = [shapes.score(sc, shapes.detect(img)) for sc, img in zip(scenes, images)]
  result = summarize(scenes, scores)
  if num_probe_pairs:
    result.update(relation_probe(pipe, num_probe_pairs, steps, cfg_scale, seed, sampler, batch_size,
                                 pair_seed=scene_seed))
  d = pipe.defaults
  result.update(split=split, steps=steps or d["num_steps"], cfg=d["guidance"] if cfg_scale is None else cfg_scale,
                sampler=sampler or d["sampler"], seed=seed)
  if out_dir:
    n = min(len(images), 32)
    sample_lib.save_grid(images[:n], os.path.join(out_dir, GRID), cols=8, overwrite=overwrite)
    write_text(os.path.join(out_dir, GRID_LIST), "".join(f"{k:02d} {'OK ' if sc['all'] else 'BAD'} {c}\n"
                                                         for k, (c, sc) in enumerate(zip(captions[:n], scores[:n]))),
               overwrite, is_grid_list, "an evaluation's grid captions")
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
  from lidit_jax import distributed
  distributed.initialize()  # first: several processes (TPU VM workers, GPU nodes) become one runtime
  from absl import flags
  from lidit_jax import configs
  from lidit_jax.pipeline import Pipeline, Workdir
  f = flags.FLAGS
  check_outputs(f.out, f.overwrite)  # before generating: a refused output costs no compute
  out_dir = os.path.dirname(os.path.abspath(f.out))
  if f["config"].value is None:  # the workdir's saved config.json (or a diffusers pipeline folder)
    pipe = Pipeline.from_pretrained(f.workdir, dtype=None)
  else:
    pipe = Pipeline(Workdir.load(f.workdir, None, configs.load_from_flags()))
  config = pipe.backend.setup.config if isinstance(pipe.backend, Workdir) else configs.base_config()
  step = getattr(pipe.backend, "step", None)
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
  from absl import flags
  from lidit_jax import configs
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
