"""Validation during training (`train.eval_every`): what the trainer logs as `val_loss`, `fid` and `clip_score`.

- val_loss: the EMA weights' loss on `train.eval_batches` held-out batches (`data.eval_split`; the demo: its
  held-out compositions), read once at seed 0, every draw (times, noise, the VAE's posterior sample) from a constant
  key: the same numbers at every evaluation, after a resume, on any device count and in any run of the same data.
- fid (with `eval.fid_inception`): images drawn for the first `eval.metric_images` held-out captions (fixed noise,
  `eval.steps` / `eval.cfg`) against `eval.fid_reference` (pytorch-fid's .npz) or, without one, the held-out
  batches' own images; pytorch-fid's conventions (`metrics.fid`), the distance in its exact low-rank form (defined
  at any image count). A few hundred images give a biased FID: compare runs at the same count, not with papers'
  30k-image numbers.
- clip_score (with `eval.clip`, a Hugging Face CLIP folder): the same images against their captions
  (`metrics.clip_score`).
"""
from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from lidit_jax.metrics import clip_score, fid
from lidit_jax.sample import to_uint8
from lidit_jax.sharding import device_batch
from lidit_jax.train_step import make_eval_step


def shared_strings(strings: list[str]) -> list[str]:
  """Process 0's list of strings on every process (SPMD sampling needs the same prompts everywhere)."""
  if jax.process_count() == 1:
    return list(strings)
  data = np.frombuffer(json.dumps(strings).encode(), np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buf = np.zeros(n, np.uint8)
  buf[:min(n, len(data))] = data[:n]
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(buf)).decode())


def gathered(x: np.ndarray) -> np.ndarray:
  """Every process's rows, concatenated in process order."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True)) if jax.process_count() > 1 else x


class Validation:
  """`validation(ema_params, step)` -> {"val_loss": ..., "fid": ..., "clip_score": ...} (the metrics configured),
  and `validation.images`: the last images drawn for the metrics (for TensorBoard)."""

  def __init__(self, s, batches: list[dict], pipe):
    e = s.config.eval
    self.s, self.batches, self.pipe, self.loss_step = s, batches, pipe, make_eval_step(s)
    self.images = None
    self.fid = fid.FeatureExtractor(e.fid_inception, batch_size=e.batch_size) if e.fid_inception else None
    self.clip = clip_score.CLIPScore(e.clip, batch_size=e.batch_size) if e.clip else None
    if self.fid is None and self.clip is None:
      return
    self.captions = shared_strings([c for b in batches for c in b["caption"]][:e.metric_images])
    self.noise = pipe.noise([jax.random.fold_in(jax.random.key(0), i) for i in range(len(self.captions))],
                            e.image_size or None, e.image_size or None)
    if self.fid is not None:
      if e.fid_reference:
        self.reference = fid.load_statistics(e.fid_reference)
      else:  # the held-out batches' own images (uint8 pixels: the config refuses latents), a batch at a time
        real = np.concatenate([self.fid.many(b["image"].astype(np.float32) / 255.0) for b in batches])  # buckets
        self.reference = fid.statistics(gathered(real))

  def __call__(self, ema_params, step: int) -> dict:
    key = jax.random.key(0)
    losses = [float(self.loss_step(ema_params, self.s.frozen, device_batch(b, self.s.mesh), jax.random.fold_in(key, i)))
              for i, b in enumerate(self.batches)]
    out = {"val_loss": float(np.mean(losses))}
    if self.fid is None and self.clip is None:
      return out
    e = self.s.config.eval
    pipe = self.pipe.with_weights(self.s.model_params(ema_params), step)
    images = to_uint8(pipe(self.captions, num_steps=e.steps, guidance=e.cfg, latents=self.noise,
                           height=e.image_size or None, width=e.image_size or None, batch_size=e.batch_size))
    self.images = images
    if self.fid is not None:
      out["fid"] = fid.frechet_distance_from_features(self.fid.many(images.astype(np.float32) / 255.0), *self.reference)
    if self.clip is not None:
      out["clip_score"] = self.clip(images, self.captions)
    return out
