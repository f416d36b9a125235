"""Offline text features: each tower's chosen hidden state (and masks) for a caption set, computed once.

`python -m lidit_jax.encode_prompts` writes a cache directory; training with `--config.text.cache=DIR`
then reads features from it and never runs (or even loads) the LLMs. Layout of DIR:
  features.safetensors   per tower NAME: NAME.hidden [N, L, D] (tower dtype; [N, L, layers, D] with
                         `all_layers`), NAME.attention_mask and
                         NAME.prompt_mask [N, L] (uint8)
  captions.json          the N captions, row i <-> caption i
  meta.json              what the features depend on (towers, layer, lengths, instruction, template);
                         checked against the training config on load
DIR is written under a temporary name and renamed when complete; an existing cache, or any non-empty
directory, is refused before encoding unless overwrite (`--overwrite`).
The cache is held in host memory (N x L x D per tower), sized for caption sets of up to a few million
tokens per tower; larger sets belong in the `features` data source of the data pipeline.
"""
from __future__ import annotations

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from lidit_jax import outputs
from lidit_jax.cli import NotFound
from lidit_jax.data import pipeline

META = "meta.json"
_TEXT_DEFAULTS = {"separator": " ", "selection": "all", "instruct_negatives": True}
# the key of a negative prompt's row where some tower encodes negatives apart (instruct_negatives=False)
_NEGATIVE = "\x00negative:"


def _bare_negatives(towers) -> bool:
  return any(t.encoder.instruction and not t.encoder.instruct_negatives for t in towers)


def signature(config, towers) -> dict:
  """Everything in the config that changes the cached features."""
  t = config.text
  return {"instruction": t.instruction, "use_chat_template": bool(t.use_chat_template),
          "padding_side": t.padding_side, "words": list(t.words),  # the word tokenizer's vocabulary
          "towers": {tw.name: {"init": os.path.abspath(tw.source) if tw.source != "random" else "random",
                               "seed": config.seed if tw.source == "random" else None,
                               "layer": "all" if tw.all_layers else tw.layer, "max_length": tw.encoder.max_length,
                               # SD's CLIP options, named only when set (caches written before them stay valid)
                               **({"final_norm": True} if tw.final_norm else {}),
                               **({"scores": tw.scores} if tw.scores else {}),  # the Diff Adapter's
                               **({"mask_padding": False} if not tw.encoder.mask_padding else {}),
                               **({"instruction": tw.encoder.instruction} if tw.encoder.instruction !=
                                  (t.instruction or None) else {}),
                               # Sana's / Lumina 2's text options, named only when set
                               **{k: getattr(tw.encoder, k) for k, default in _TEXT_DEFAULTS.items()
                                  if getattr(tw.encoder, k) != default},
                               "dtype": jnp.dtype(tw.dtype).name, "hidden_size": tw.hidden_size}
                     for tw in towers}}


def check_out(out: str, overwrite: bool = False):
  """Refuse `out` when it holds a cache or anything else (unless `overwrite`), or cannot be written."""
  if os.path.exists(os.path.join(out, META)) and not overwrite:  # hours of encoding: replaced only when asked
    raise FileExistsError(f"{out} already holds a text cache. Fix: choose a new --out, or pass --overwrite to "
                          "replace it")
  outputs.preflight(out, overwrite, what="a text cache")


def write(out: str, config, towers, tower_params, captions, batch_size: int = 64, progress: bool = True,
          overwrite: bool = False) -> dict:
  """Encode the unique `captions` with every tower; returns the summary that is also printed by the CLI."""
  check_out(out, overwrite)
  unique = list(dict.fromkeys(captions))
  if not unique:
    raise ValueError("no captions to encode. Fix: pass --captions FILE (one per line) or --source shapes.")
  n = len(unique) + _bare_negatives(towers)  # and the empty prompt as a negative (the null context)
  arrays = {}
  for tw in towers:
    arrays[f"{tw.name}.hidden"] = np.zeros((n, *tw.feature_shape), jnp.dtype(tw.dtype))
    for m in ("attention_mask", "prompt_mask"):
      arrays[f"{tw.name}.{m}"] = np.zeros((n, tw.encoder.max_length), np.uint8)
  encode = {tw.name: jax.jit(tw.encode) for tw in towers}
  jobs = [(unique[i:i + batch_size], i, False) for i in range(0, len(unique), batch_size)]
  if n > len(unique):
    jobs.append(([""], len(unique), True))
  for chunk, start, negative in tqdm(jobs, desc="encoding", unit="batch", disable=not progress):
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
    tokens = pipeline.tokenize(towers, padded, negative)
    for tw in towers:
      tok = tokens[tw.name]
      hidden = encode[tw.name](tower_params[tw.name], tok)
      rows = slice(start, start + len(chunk))
      arrays[f"{tw.name}.hidden"][rows] = np.asarray(hidden)[:len(chunk)]
      for m in ("attention_mask", "prompt_mask"):
        arrays[f"{tw.name}.{m}"][rows] = tok[m][:len(chunk)]
  num_bytes = int(sum(a.nbytes for a in arrays.values()))
  with outputs.staged(out, overwrite, what="a text cache", need_bytes=num_bytes) as tmp:
    os.makedirs(tmp)
    save_file(arrays, os.path.join(tmp, "features.safetensors"))
    with open(os.path.join(tmp, "captions.json"), "w", encoding="utf-8") as f:
      json.dump(unique + [_NEGATIVE] * (n - len(unique)), f)
    with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
      json.dump({**signature(config, towers), "num_captions": n}, f, indent=2)
  return {"out": out, "captions": n, "bytes": num_bytes}


class TextCache:
  """Captions -> {tower: {hidden, attention_mask, prompt_mask}} numpy arrays, as the towers would give."""

  def __init__(self, path: str, config, towers):
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f"text.cache={path!r} holds no finished text cache ({META} is missing). Fix: run "
                              f"python -m lidit_jax.encode_prompts --config ... --out {path}")
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    want = signature(config, towers)
    for key in ("instruction", "use_chat_template", "padding_side", "words"):
      if meta.get(key) != want[key]:
        raise ValueError(f"text.cache={path!r} was encoded with text.{key}={meta[key]!r}, the config has "
                         f"{want[key]!r}. Fix: re-run encode_prompts with this config, or drop text.cache.")
    for name, spec in want["towers"].items():
      have = meta["towers"].get(name)
      if have != spec:
        raise ValueError(f"text.cache={path!r} does not match tower {name!r}: cached {have}, config {spec}. "
                         "Fix: re-run python -m lidit_jax.encode_prompts with this config.")
    with open(os.path.join(path, "captions.json"), encoding="utf-8") as f:
      self.index = {c: i for i, c in enumerate(json.load(f))}
    self.arrays = load_file(os.path.join(path, "features.safetensors"))
    self.path, self.names, self.bare_negatives = path, list(want["towers"]), _bare_negatives(towers)

  def __call__(self, captions, negative: bool = False) -> dict:
    key = (lambda c: _NEGATIVE + c) if negative and self.bare_negatives else (lambda c: c)
    rows = [self.index.get(key(c), -1) for c in captions]
    missing = [c for c, r in zip(captions, rows) if r < 0]
    if missing:
      raise NotFound(f"{len(missing)} caption(s) are not in text cache {self.path}, e.g. {missing[0]!r}. Fix: "
                     "re-run encode_prompts over the captions this run reads, or drop text.cache.")
    rows = np.asarray(rows)
    return {n: {"hidden": self.arrays[f"{n}.hidden"][rows],
                "attention_mask": self.arrays[f"{n}.attention_mask"][rows].astype(np.int32),
                "prompt_mask": self.arrays[f"{n}.prompt_mask"][rows].astype(np.int32)} for n in self.names}


class MemoryCache:
  """`text.cache="memory"`: each caption's features are computed by the towers the first time a batch holds it,
  then kept in host memory (least recently used dropped beyond `capacity` captions). For finite caption sets
  such as the demo's, most steps then skip the towers. New captions of a batch are encoded together, padded to
  the batch's size, so the towers compile once."""

  def __init__(self, towers, tower_params, capacity: int = 1 << 17):
    if jax.process_count() > 1:
      raise ValueError("text.cache='memory' encodes each process's captions on its own; with several processes "
                       "precompute the features instead. Fix: python -m lidit_jax.encode_prompts, then "
                       "--config.text.cache=DIR.")
    self.towers, self.params, self.capacity = towers, tower_params, capacity
    self.encode = {t.name: jax.jit(t.encode) for t in towers}
    self.rows: collections.OrderedDict[tuple[str, bool], dict] = collections.OrderedDict()  # (caption, negative)
    self.hits = self.misses = 0

  def _encode(self, captions, batch: int, negative: bool):
    for start in range(0, len(captions), batch):
      chunk = captions[start:start + batch]
      tokens = pipeline.tokenize(self.towers, chunk + [chunk[-1]] * (batch - len(chunk)), negative)
      hidden = {t.name: np.asarray(self.encode[t.name](self.params[t.name], tokens[t.name])) for t in self.towers}
      for k, c in enumerate(chunk):
        self.rows[(c, negative)] = {t.name: {"hidden": hidden[t.name][k], **{
            m: tokens[t.name][m][k] for m in ("attention_mask", "prompt_mask")}} for t in self.towers}
    while len(self.rows) > self.capacity:
      self.rows.popitem(last=False)

  def __call__(self, captions, negative: bool = False) -> dict:
    captions = list(captions)
    new = [c for c in dict.fromkeys(captions) if (c, negative) not in self.rows]
    self.misses += len(new)
    self.hits += len(captions) - len(new)
    if new:
      self._encode(new, len(captions), negative)
    for c in captions:
      self.rows.move_to_end((c, negative))
    return {t.name: {k: np.stack([self.rows[(c, negative)][t.name][k] for c in captions])
                     for k in ("hidden", "attention_mask", "prompt_mask")} for t in self.towers}
