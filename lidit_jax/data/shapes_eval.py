"""The shapes demo's evaluator (`data.source=shapes`): held-out compositions drawn by the model, scored by detecting
every object's colour, shape and position programmatically (data/shapes.py), and the relation probe.

Accuracy per kind (colour, shape, object = both, relation), whole-prompt accuracy, and object accuracy by the
phrase's position in the prompt (first vs last phrase, and by relative position in quarters: LI-DiT's
positional-bias measure, Figure 3, at toy scale; split "train" on a model trained with data.max_objects up to 6
scores prompts of 2 to 6 phrases).

The relation probe (`relation_sensitivity`) asks whether the relation word moves the objects: each probe pair of
objects is drawn from the same noise four times, once per relation word, and the second object's offset from the
first is measured along the relation's axis. A model that follows relations moves the second object by about an
object's width (7-11 px) to the asked side; one that ignores the word leaves it near 0.
"""
from __future__ import annotations

import numpy as np

from lidit_jax import sample as sample_lib
from lidit_jax.data import shapes


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


def offset(image, a, b):
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
  axis = {r: shapes.REL_GEOMETRY[r][0] for r in rels}
  along = {r: [] for r in rels}
  halves = []
  for k, (a, b) in enumerate(pairs):
    off = {r: offset(images[4 * k + i], a, b) for i, r in enumerate(rels)}
    for r in rels:
      if off[r] is not None:
        along[r].append(off[r][axis[r]])
    for pos, neg in ((rels[0], rels[1]), (rels[2], rels[3])):  # left vs right, above vs below
      if off[pos] is not None and off[neg] is not None:
        halves.append(0.5 * (off[pos][axis[pos]] - off[neg][axis[neg]]))
  mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
  return {"relation_sensitivity": mean(halves), "relation_offsets": {r: mean(v) for r, v in along.items()},
          "relation_probe_pairs": len(pairs), "relation_probe_found": len(halves) / (2 * len(pairs))}


def score(pipe, num_prompts: int, steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
          sampler: str | None = None, batch_size: int = 64, split: str = "heldout", min_objects: int = 2,
          num_probe_pairs: int = 0, scene_seed: int = 0, max_objects: int = 3) -> tuple[dict, np.ndarray, list]:
  """(scores, images, one line per image: "NN OK  caption" / "NN BAD caption") of `pipe` on `num_prompts` scenes
  drawn from `scene_seed` (the relation probe's pairs too)."""
  scenes = eval_scenes(split, num_prompts, scene_seed, min_objects, max_objects)
  captions = [sc.caption(k % shapes.N_TEMPLATES) for k, sc in enumerate(scenes)]
  images = sample_lib.generate_images(pipe, captions, 1, seed=seed, steps=steps, cfg_scale=cfg_scale,
                                      sampler=sampler, batch_size=batch_size)[:, 0]
  scores = [shapes.score(sc, shapes.detect(img)) for sc, img in zip(scenes, images)]
  result = summarize(scenes, scores)
  if num_probe_pairs:
    result.update(relation_probe(pipe, num_probe_pairs, steps, cfg_scale, seed, sampler, batch_size,
                                 pair_seed=scene_seed))
  lines = [f"{k:02d} {'OK ' if sc['all'] else 'BAD'} {c}" for k, (c, sc) in enumerate(zip(captions, scores))]
  return result, images, lines
