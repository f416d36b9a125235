"""A second opinion on the evaluator: its own detector and prompt reader, run on saved evaluation grids.

  python -m benchmarks.independent_check GRID.png [GRID.png ...] [--json out.json]

Each GRID.png is an `eval_grid.png` written by the evaluator (32 px tiles, 8 per row, 2 px gaps, upscaled 4x)
with its `eval_grid.txt` beside it ("NN OK|BAD caption"). Nothing here calls the demo's detector, scorer or
scene code: the captions are read back from their words, pixels take the nearest palette colour in RGB
(background included), blobs are 8-connected (scipy.ndimage), a blob's shape is the ideal disk, box or upward
triangle over its bounding box with the highest IoU, objects of one colour take distinct blobs of it (the
assignment with most shapes right, then most area), and a relation holds when the centres are in the asked order
along the asked axis (the order alone: chance 0.5; the evaluator also asks for 2 px and the asked axis to
dominate). On the renderer's own images both score 1.0. The same tiles are also scored by the evaluator (`lidit_jax.data.shapes`), so the two can be compared image for image.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re

import numpy as np
from PIL import Image
from scipy import ndimage

# The demo's words and colours, restated (the palette is the renderer's; the rest is read from the captions).
PALETTE = {"red": (225, 45, 45), "green": (45, 200, 70), "blue": (55, 95, 240), "yellow": (235, 215, 50)}
BACKGROUND = (16, 16, 24)
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"to the left of": (0, +1), "to the right of": (0, -1), "above": (1, +1), "below": (1, -1)}
TILE, GAP, SCALE, COLS, MIN_AREA = 32, 2, 4, 8, 6


def read_grid(png: str, txt: str) -> tuple[np.ndarray, list[str]]:
  """The tiles [N, 32, 32, 3] uint8 of an evaluation grid and their captions."""
  with open(txt, encoding="utf-8") as f:
    captions = [line.split(" ", 2)[2].strip() for line in f if line.strip()]
  grid = np.asarray(Image.open(png).convert("RGB"))[::SCALE, ::SCALE]  # undo the nearest-neighbour upscale
  tiles = []
  for k in range(len(captions)):
    r, q = divmod(k, COLS)
    y, x = GAP + r * (TILE + GAP), GAP + q * (TILE + GAP)
    tiles.append(grid[y:y + TILE, x:x + TILE])
  return np.stack(tiles), captions


def parse_caption(caption: str) -> tuple[list[tuple[str, str]], list[tuple[int, str, int]]]:
  """Objects in order of first mention, and relations between the mentions either side of each relation phrase."""
  pattern = "|".join([rf"(?P<obj>(?:{'|'.join(PALETTE)}) (?:{'|'.join(SHAPES)}))"] +
                     [re.escape(r) for r in sorted(RELATIONS, key=len, reverse=True)])
  objects, mentions = [], []  # mentions: object index or relation string, in reading order
  for m in re.finditer(pattern, caption):
    if m.group("obj"):
      obj = tuple(m.group("obj").split())
      if obj not in objects:
        objects.append(obj)
      mentions.append(objects.index(obj))
    else:
      mentions.append(m.group(0))
  relations = [(mentions[k - 1], r, mentions[k + 1]) for k, r in enumerate(mentions)
               if isinstance(r, str) and 0 < k < len(mentions) - 1]
  return objects, relations


def _ideal_masks(h: int, w: int) -> dict[str, np.ndarray]:
  y, x = np.mgrid[0:h, 0:w] + 0.5  # pixel centres in box coordinates
  u, v = x / w, y / h
  return {"circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
          "square": np.ones((h, w), bool),
          "triangle": np.abs(u - 0.5) <= 0.5 * v}  # apex at the top centre, base along the bottom


def blobs(image: np.ndarray) -> list[dict]:
  """Coloured blobs of one uint8 image, largest first: colour, shape, centre (x, y) and area."""
  colours = np.asarray([BACKGROUND] + list(PALETTE.values()), np.float32)
  dist = ((image.astype(np.float32)[:, :, None, :] - colours) ** 2).sum(-1)
  nearest = dist.argmin(-1)  # 0 = background
  out = []
  for k, name in enumerate(PALETTE, start=1):
    labels, n = ndimage.label(nearest == k, structure=np.ones((3, 3)))
    for lab in range(1, n + 1):
      ys, xs = np.nonzero(labels == lab)
      if len(ys) < MIN_AREA:
        continue
      mask = np.zeros((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), bool)
      mask[ys - ys.min(), xs - xs.min()] = True
      iou = {s: (mask & m).sum() / (mask | m).sum() for s, m in _ideal_masks(*mask.shape).items()}
      out.append({"colour": name, "shape": max(iou, key=iou.get), "x": xs.mean() + 0.5, "y": ys.mean() + 0.5,
                  "area": len(ys)})
  return sorted(out, key=lambda b: -b["area"])


def check(image: np.ndarray, caption: str) -> dict:
  """Per-object colour / shape, per-relation and count verdicts for one image against its caption."""
  objects, relations = parse_caption(caption)
  seen = blobs(image)
  found = [None] * len(objects)
  for colour in {c for c, _ in objects}:
    # Objects of one colour take distinct blobs of it: the assignment with most shapes right, then most area.
    want = [k for k, (c, _) in enumerate(objects) if c == colour]
    have = [b for b in seen if b["colour"] == colour]
    slots = have + [None] * max(0, len(want) - len(have))
    value = lambda pick: (sum(b is not None and b["shape"] == objects[k][1] for k, b in zip(want, pick)),
                          sum(b["area"] for b in pick if b is not None))
    best = max(itertools.permutations(slots, len(want)), key=value)
    for k, b in zip(want, best):
      found[k] = b
  colour_ok = [b is not None for b in found]
  shape_ok = [b is not None and b["shape"] == s for b, (_, s) in zip(found, objects)]
  rel_ok = []
  for i, r, j in relations:
    axis, sign = RELATIONS[r]
    a, b = found[i], found[j]
    key = "xy"[axis]
    rel_ok.append(a is not None and b is not None and sign * (b[key] - a[key]) > 0)
  return {"colour": colour_ok, "shape": shape_ok, "relation": rel_ok, "count": len(seen) == len(objects)}


def summarize(verdicts: list[dict]) -> dict:
  flat = lambda key: [v for d in verdicts for v in d[key]]
  return {"images": len(verdicts), "colour": float(np.mean(flat("colour"))), "shape": float(np.mean(flat("shape"))),
          "relation": float(np.mean(flat("relation"))) if flat("relation") else float("nan"),
          "count": float(np.mean([d["count"] for d in verdicts]))}


def evaluator_verdicts(images: np.ndarray, captions: list[str]) -> list[dict]:
  """The demo's own evaluator on the same tiles (the scenes rebuilt from this module's reading of the captions)."""
  from lidit_jax.data import shapes
  out = []
  for img, cap in zip(images, captions):
    objects, relations = parse_caption(cap)
    sc = shapes.score(shapes.Scene(tuple(objects), tuple(relations)), shapes.detect(img))
    out.append({k: sc[k] for k in ("colour", "shape", "relation", "count")})
  return out


def compare(grids: list[str]) -> dict:
  ours, theirs = [], []
  for png in grids:
    images, captions = read_grid(png, os.path.splitext(png)[0] + ".txt")
    theirs += [check(img, cap) for img, cap in zip(images, captions)]
    ours += evaluator_verdicts(images, captions)
  return {"independent": summarize(theirs), "evaluator": summarize(ours), "grids": len(grids)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("grids", nargs="+", help="eval_grid.png files (each with its eval_grid.txt beside it)")
  p.add_argument("--json", help="also write the comparison here")
  a = p.parse_args(argv)
  missing = [g for g in a.grids if not os.path.exists(g) or not os.path.exists(os.path.splitext(g)[0] + ".txt")]
  if missing:
    p.error(f"{missing}: no such grid or no .txt beside it. Fix: pass eval_grid.png files the evaluator wrote")
  result = compare(a.grids)
  print(json.dumps(result, indent=2))
  if a.json:
    with open(a.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
