"""Shared streaming of PyTorch checkpoints into Flax parameter trees.

A converter describes the target tree as a *plan*: Flax parameter path -> `Source` (the Hugging Face
key(s) it comes from and a numpy transform). `build_params` walks the plan one tensor at a time: read
(safetensors' numpy API, no torch), transform, cast, and place straight into the target sharding. A
scanned stack of layers is filled layer by layer into one preallocated host buffer, so the host never
holds more than one parameter besides what is already on the devices.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

logger = logging.getLogger(__name__)

Key = str | tuple[str, ...]  # one name, or alternatives tried in order (e.g. tied embeddings)


def _identity(x: np.ndarray) -> np.ndarray:
  return x


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one Flax parameter comes from. Several keys are stacked on a new leading (layers) axis."""
  keys: tuple[Key, ...]
  transform: Callable[[np.ndarray], np.ndarray] = _identity
  stacked: bool = False

  @classmethod
  def one(cls, key: Key, transform: Callable = _identity) -> "Source":
    return cls((key,), transform, stacked=False)

  @classmethod
  def layers(cls, pattern: str, n: int, transform: Callable = _identity) -> "Source":
    """`pattern` holds `{}` for the layer index: "layers.{}.mlp.up_proj.weight"."""
    return cls(tuple(pattern.format(i) for i in range(n)), transform, stacked=True)


Plan = Mapping[tuple[str, ...], Source]


def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Flax kernel [in, out]."""
  return w.T


def heads_in(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
  """q/k/v projection [H*K, D] -> HeadsDense kernel [D, H, K]."""
  return lambda w: w.T.reshape(w.shape[1], num_heads, -1)


def heads_bias(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
  return lambda b: b.reshape(num_heads, -1)


def heads_out(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
  """output projection [D, H*K] -> HeadsDense kernel [H, K, D]."""
  return lambda w: w.T.reshape(num_heads, -1, w.shape[0])


class CheckpointFiles:
  """The tensors of a Hugging Face model directory: one `model.safetensors`, or shards + index.

  Keys may carry a prefix that depends on the class that saved them ("model." for *ForCausalLM,
  "text_model." for CLIP, "encoder." for T5); `find_prefix` resolves it from an anchor key.
  """

  def __init__(self, directory: str, allow_pickle: bool = False):
    self.directory = directory
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    self._pickle: dict[str, np.ndarray] | None = None
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.key_to_file = {k: os.path.join(directory, v) for k, v in weight_map.items()}
      missing = sorted({p for p in self.key_to_file.values() if not os.path.exists(p)})
      if missing:
        raise FileNotFoundError(f"{index} names shards that do not exist: {missing}. Fix: download the "
                                "complete checkpoint (every shard the index lists).")
    elif os.path.exists(single):
      with safe_open(single, "np") as f:
        self.key_to_file = {k: single for k in f.keys()}
    else:
      bins = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth")))
      if not bins:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}.")
      if not allow_pickle:
        raise ValueError(f"{directory} holds only pickle checkpoints ({', '.join(bins)}), which can run code "
                         "when loaded. Fix: convert them to safetensors, or pass allow_pickle=True "
                         "(CLI: --allow-pickle) to load them with torch's weights_only mode.")
      self._pickle = self._load_pickle([os.path.join(directory, b) for b in bins])
      self.key_to_file = {k: "<pickle>" for k in self._pickle}
    self._open: dict[str, object] = {}
    self.prefix = ""
    self.used: set[str] = set()

  @staticmethod
  def _load_pickle(paths: Sequence[str]) -> dict[str, np.ndarray]:
    import torch  # only on explicit request: pickle checkpoints need torch to unpickle
    out = {}
    for p in paths:
      sd = torch.load(p, map_location="cpu", weights_only=True)
      out.update({k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()})
    return out

  def keys(self) -> list[str]:
    return list(self.key_to_file)

  def find_prefix(self, anchors: Iterable[str]) -> str:
    """The prefix in front of the first anchor key found (e.g. 'model.'), which later reads add."""
    for anchor in anchors:
      for k in self.key_to_file:
        if k.endswith(anchor) and (k == anchor or k[: -len(anchor)].endswith(".")):
          self.prefix = k[: -len(anchor)]
          return self.prefix
    raise KeyError(f"{self.directory}: none of {list(anchors)} found among {len(self.key_to_file)} tensors "
                   f"(first few: {self.keys()[:5]}). Is this the right kind of model?")

  def resolve(self, key: Key) -> str | None:
    for k in (key,) if isinstance(key, str) else key:
      if self.prefix + k in self.key_to_file:
        return self.prefix + k
    return None

  def read(self, key: str) -> np.ndarray:
    self.used.add(key)
    if self._pickle is not None:
      return self._pickle[key]
    path = self.key_to_file[key]
    if path not in self._open:
      self._open[path] = safe_open(path, "np")
    return self._open[path].get_tensor(key)

  def shape(self, key: str) -> tuple[int, ...]:
    if self._pickle is not None:
      return tuple(self._pickle[key].shape)
    path = self.key_to_file[key]
    if path not in self._open:
      self._open[path] = safe_open(path, "np")
    return tuple(self._open[path].get_slice(key).get_shape())

  def unused(self) -> list[str]:
    return sorted(set(self.key_to_file) - self.used)


class ConversionError(ValueError):
  pass


def _set(tree: dict, path: tuple[str, ...], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def build_params(plan: Plan, files: CheckpointFiles, expected: Mapping[tuple[str, ...], jax.ShapeDtypeStruct],
                 dtype, shardings: Mapping[tuple[str, ...], jax.sharding.Sharding] | None = None,
                 progress: bool = False) -> dict:
  """Stream every planned tensor into a nested params dict of jax Arrays (in `dtype`).

  `expected` gives each path's shape (from `jax.eval_shape` of the module's init). All missing keys and
  mis-shaped tensors are gathered and reported together, by name, before anything is read.
  """
  problems = []
  unplanned = sorted(set(expected) - set(plan))
  if unplanned:
    problems.append(f"parameters with no source in the plan: {['/'.join(p) for p in unplanned]}")
  resolved = {}
  for path, src in plan.items():
    names = [files.resolve(k) for k in src.keys]
    missing = [k if isinstance(k, str) else " or ".join(k) for k, n in zip(src.keys, names) if n is None]
    if missing:
      problems.append(f"missing {files.prefix}{missing[0]}" + (f" (+{len(missing) - 1} more layers)"
                                                               if len(missing) > 1 else ""))
    resolved[path] = names
    if not missing and path in expected:  # shape check without reading: transform a zero-stride stand-in
      want = tuple(expected[path].shape)[1 if src.stacked else 0:]
      for name in names:
        got = tuple(src.transform(np.broadcast_to(np.zeros((), np.float32), files.shape(name))).shape)
        if got != want:
          problems.append(f"{name}: shape {files.shape(name)} (-> {got} after conversion), but {'/'.join(path)} "
                          f"needs {want}")
          break
  if problems:
    raise ConversionError(f"cannot convert {files.directory}:\n  " + "\n  ".join(problems) +
                          "\nFix: check that config.json is the one these weights were saved with.")

  np_dtype = np.dtype(jnp.dtype(dtype))
  params: dict = {}
  items = list(plan.items())
  if progress:
    from tqdm import tqdm
    items = tqdm(items, desc="converting", unit="tensor")
  for path, src in items:
    want = tuple(expected[path].shape)
    names = resolved[path]
    per_layer = want[1:] if src.stacked else want
    host = np.empty(want, np_dtype) if src.stacked else None
    for i, name in enumerate(names):
      arr = src.transform(files.read(name))
      assert tuple(arr.shape) == per_layer, (name, arr.shape, per_layer)  # checked above
      if src.stacked:
        host[i] = arr  # casts in place, one layer at a time
      else:
        host = np.asarray(arr, np_dtype)
      del arr
    sharding = shardings.get(path) if shardings else None
    if sharding is None:
      value = jax.device_put(host)
    else:
      value = jax.make_array_from_callback(want, sharding, lambda idx, h=host: h[idx])
    del host
    _set(params, path, value)
  return params


def flatten_shapes(tree) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat[tuple(p.key for p in path)] = leaf
  return flat
