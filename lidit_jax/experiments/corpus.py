"""A caption corpus for towers that should know the shapes demo's language (issue 17): the demo's colours, shapes
and relations in many phrasings, long multi-sentence descriptions, inverse relations ("the blue square is to the
right of the red circle"), and distractor sentences that name nothing in the picture.

`texts(n, split, seed)` draws the scenes with `data.shapes.sample_scene`, so the held-out split holds the demo's
held-out compositions: a tower's held-out loss measures how it generalises to relations it never read.
"""
from __future__ import annotations

import numpy as np

from lidit_jax.data import shapes

# each relation's phrasings (the demo's own first) and its mirror image
PHRASINGS = {"to the left of": ("to the left of", "left of", "on the left of"),
             "to the right of": ("to the right of", "right of", "on the right of"),
             "above": ("above", "over", "on top of"),
             "below": ("below", "under", "beneath")}
MIRROR = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
          "below": "above"}
DISTRACTORS = ("the background is dark .", "the picture is small .", "nothing else is drawn .",
               "the shapes do not touch .", "it is a simple drawing .", "every shape is filled .",
               "the image has no text .")
INSTRUCTIONS = ("describe the objects :", "describe the picture :", "describe the picture in detail :")


def _object(rng, colour: str, shape: str) -> str:
  return ("a {c} {s}", "one {c} {s}", "a {s} that is {c}", "a {c} coloured {s}")[int(rng.integers(4))].format(
      c=colour, s=shape)


def describe(scene: shapes.Scene, rng: np.random.Generator) -> str:
  """One description of `scene`: the demo's captions, one sentence per relation (either direction), an inventory
  then relations, with distractor sentences mixed in."""
  objs = scene.objects
  names = [f"{c} {s}" for c, s in objs]
  style = int(rng.integers(5))
  if style == 0:  # the demo's own caption
    text = scene.caption(int(rng.integers(shapes.N_TEMPLATES)))
  else:
    sentences = []
    if style >= 3 or not scene.relations:  # an inventory first
      listed = [_object(rng, *o) for o in objs]
      listed = listed[0] if len(listed) == 1 else " , ".join(listed[:-1]) + " and " + listed[-1]
      sentences.append(("there is {} .", "the picture shows {} .", "you can see {} .")[int(rng.integers(3))]
                       .format(listed))
    for i, rel, j in scene.relations:
      if rng.random() < 0.5:  # the relation as stated
        a, r, b = names[i], rel, names[j]
      else:  # or mirrored
        a, r, b = names[j], MIRROR[rel], names[i]
      word = PHRASINGS[r][int(rng.integers(3))]
      article = "the" if style >= 3 else "a"
      sentences.append(f"{article} {a} is {word} {article} {b} .")
    for _ in range(int(rng.integers(3))):  # distractors anywhere
      sentences.insert(int(rng.integers(len(sentences) + 1)), DISTRACTORS[int(rng.integers(len(DISTRACTORS)))])
    text = " ".join(sentences)
  return text


# objects per training scene: 1 to 3 (relations) as the demo draws them, and inventories of 4 to 6 (the
# positional-bias study's long prompts); half the scenes have relations
TRAIN_OBJECT_WEIGHTS = (1.0, 2.0, 2.0, 1.0, 1.0, 1.0)


def scenes(n: int, split: str, rng: np.random.Generator) -> list[shapes.Scene]:
  """`n` scenes of `split` ("train": 1 to 6 objects; "heldout": the demo's held-out 2- and 3-object compositions)."""
  if split == "train":
    return [shapes.sample_scene(rng, split, 6, TRAIN_OBJECT_WEIGHTS) for _ in range(n)]
  return [shapes.sample_scene(rng, split, 3, [0.0, 1.0, 1.0]) for _ in range(n)]


def texts(n: int, split: str = "train", seed: int = 0) -> list[str]:
  """`n` descriptions of scenes of `split` (see `scenes`)."""
  rng = np.random.default_rng([seed, 0xC0])
  return [describe(scene, rng) for scene in scenes(n, split, rng)]


def vocabulary() -> list[str]:
  """Every word and punctuation mark the corpus can produce, sorted."""
  words = set(shapes.VOCABULARY) | {w for p in PHRASINGS.values() for ph in p for w in ph.split()}
  words |= {w for t in DISTRACTORS + INSTRUCTIONS for w in t.split()}
  words |= {"one", "that", "coloured", "picture", "shows", "you", "can", "see", ",", "."}
  return sorted(words)
