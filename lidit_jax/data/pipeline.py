"""Host-side batches: images plus the text input of every tower (tokens, or cached features).

The shapes demo source is index-addressable, so the iterator state is one integer and a resumed run
sees exactly the batches it would have seen.
"""
from __future__ import annotations

import jax
import numpy as np

from lidit_jax.data import shapes


def tokenize(towers, captions) -> dict:
  """{tower name: {input_ids, attention_mask, prompt_mask}} as numpy arrays."""
  return {t.name: t.encoder(list(captions)) for t in towers}


class ShapesBatches:
  """Infinite iterator over demo batches; each process reads its own slice of every global batch."""

  def __init__(self, config, text_for, split: str = "train"):
    """`text_for(captions)` gives the per-tower text inputs (`Setup.text_for`: tokens or cached features)."""
    self.source = shapes.ShapesSource(size=config.data.image_size, seed=config.seed, split=split,
                                      max_objects=config.data.max_objects)
    self.text_for = text_for
    self.global_batch = config.train.batch_size
    self.local_batch = self.global_batch // jax.process_count()
    self.index = 0  # global example index of the next batch

  def state(self) -> dict:
    return {"index": int(self.index)}

  def restore(self, state: dict):
    self.index = int(state["index"])

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    start = self.index + jax.process_index() * self.local_batch
    b = self.source.batch(start, self.local_batch)
    self.index += self.global_batch
    return {"image": np.asarray(b["image"], np.float32), "text": self.text_for(b["caption"]),
            "caption": b["caption"]}
