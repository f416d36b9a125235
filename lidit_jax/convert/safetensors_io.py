"""Shared streaming of PyTorch checkpoints into Flax parameter trees.

A converter describes the target tree as a *plan*: Flax parameter path -> `Source` (the Hugging Face
key(s) it comes from and a numpy transform). `build_params` walks the plan one tensor at a time: read
(plain file reads at the offsets of the safetensors header, no torch, no mmap), transform, cast, and
place straight into the target sharding. A scanned stack of layers is filled layer by layer into one
preallocated host buffer, so the host never holds more than one parameter besides what is already on the
devices. The convert CLI asks for host numpy arrays instead (`as_numpy`) and hands each finished
parameter to its Orbax writer (`sink`), so it never holds the whole tree.

Memory: tensors are read with `readinto` into buffers this module allocates, not through safetensors'
mmap, whose touched pages would stay resident (file-backed RSS the size of the checkpoint) for as long as
the shards are open. Host buffers are 64-byte aligned so that `jax.device_put` on CPU adopts them
without a copy. Speed: a transform that only reshapes (e.g. [H*K, D] -> [H, K, D], as the decoder LLMs'
[out, in] kernels need) is a numpy view, and a stacked layer of that kind is read straight into its
slot of the stack: no copy at all besides the read. Other layout transforms (transposes, for the T5 and
CLIP towers) run as jitted XLA ops on the CPU backend, which transposes bf16 ~3x faster than numpy's
strided copy; they are pure data movement, so the result is bit-identical.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import struct
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax.linen import meta
from safetensors import safe_open
from tqdm import tqdm

from lidit_jax.cli import NotFound, UserError

logger = logging.getLogger(__name__)

Key = str | tuple[str, ...]  # one name, or alternatives tried in order (e.g. tied embeddings)


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def with_inverse(transform: Callable, inverse: Callable) -> Callable:
  """`transform` (PyTorch layout -> ours), knowing its inverse: export (`to_state_dict`) writes PyTorch's back."""
  transform.inverse = inverse
  return transform


with_inverse(_identity, _identity)


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

# safetensors dtype names read directly; any other dtype is read through safetensors' own numpy API
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
          "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn,
          "F8_E5M2": ml_dtypes.float8_e5m2}
ALIGN = 64  # XLA's CPU client adopts a host buffer without copying only at this alignment


def aligned_empty(shape, dtype, align: int = ALIGN) -> np.ndarray:
  """np.empty, with the data `align`-byte aligned."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _read_header(path: str) -> tuple[int, dict]:
  """(offset of the data, header) of a safetensors file."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return 8 + n, header


def _transpose(w: np.ndarray) -> np.ndarray:
  return w.T


linear = with_inverse(lambda w: w.T, _transpose)  # torch Linear weight [out, in] <-> Flax kernel [in, out]


def heads_in(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
  """q/k/v projection [H*K, D] -> HeadsDense kernel [D, H, K]."""
  return with_inverse(lambda w: w.T.reshape(w.shape[1], num_heads, -1), lambda k: k.reshape(k.shape[0], -1).T)


def heads_bias(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
  return with_inverse(lambda b: b.reshape(num_heads, -1), lambda b: b.reshape(-1))


def heads_out(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
  """output projection [D, H*K] -> HeadsDense kernel [H, K, D]."""
  return with_inverse(lambda w: w.T.reshape(num_heads, -1, w.shape[0]), lambda k: k.reshape(-1, k.shape[-1]).T)


def to_state_dict(plan: "Plan", params) -> dict[str, np.ndarray]:
  """The inverse of a plan (export): {checkpoint key: float32 numpy array in PyTorch's layout} of a parameter
  tree (alternative keys: the first; a stacked parameter: one key per layer)."""
  flat = flatten_shapes(params)
  out = {}
  for path, src in plan.items():
    inverse = getattr(src.transform, "inverse", None)
    if inverse is None:
      raise ValueError(f"{'/'.join(path)}: its conversion has no inverse, so it cannot be exported")
    value = np.asarray(flat[path], np.float32)
    for i, key in enumerate(src.keys):
      out[key if isinstance(key, str) else key[0]] = np.ascontiguousarray(inverse(value[i] if src.stacked else value))
  return out


def read_json(path: str) -> dict:
  """A model's JSON file (config.json, model_index.json, a shard index), named when it is not valid JSON."""
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except ValueError as e:  # json's own text names a line and column, never the file
      raise UserError(f"{path} is not valid JSON ({e}). Fix: restore that file from the model's original download "
                      "(or repair it by hand)") from e


def strip_boxes(tree):
  """Values of a tree of logically partitioned boxes (nn.unbox would apply sharding constraints, which
  fail on abstract values under a mesh)."""
  return jax.tree.map(lambda b: b.value if isinstance(b, meta.AxisMetadata) else b, tree,
                      is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def read_component_config(where: str, class_name: str, parse):
  """`parse(config dict, its path)` of a diffusers model folder's config.json (or that file)."""
  path = os.path.join(where, "config.json") if os.path.isdir(where) else where
  if not os.path.exists(path):
    raise NotFound(f"{path} does not exist. Fix: point at a diffusers {class_name} folder or its config.json")
  return parse(read_json(path), path)


def metadata(path: str) -> dict | None:
  """The `__metadata__` of a safetensors file, or None when `path` is not a readable safetensors file."""
  try:
    with safe_open(path, "np") as f:
      return f.metadata() or {}
  except Exception:  # noqa: BLE001  SafetensorError (no OSError) for anything that is not safetensors
    return None


PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def require_safetensors(path: str) -> None:
  """Refuse a single checkpoint file that is not .safetensors, saying how to get one (pickles are never read)."""
  if path.endswith(".safetensors"):
    return
  if path.endswith(PICKLE_SUFFIXES):
    raise UserError(f"{path} is a PyTorch pickle checkpoint, which can run code when loaded, so it is not read. Fix: "
                    "download the model's .safetensors release (most checkpoints publish one), or convert this file "
                    "in a sandbox with a tool you trust (torch.load(path, weights_only=True)['state_dict'], then "
                    "safetensors.torch.save_file)")
  raise UserError(f"{path} is not a .safetensors file. Fix: point at the checkpoint's .safetensors file")


def component_dir(path: str, subfolder: str, class_name: str) -> str:
  """A diffusers component's folder: `path` itself, or its `subfolder` (vae/, unet/) when `path` is a pipeline."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(path):
    raise NotFound(f"{subfolder} path {path!r} is not a directory. Fix: point at a diffusers {class_name} folder "
                   f"(config.json + diffusion_pytorch_model.safetensors) or a pipeline folder with {subfolder}/")
  if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, subfolder)):
    return os.path.join(path, subfolder)
  return path


class CheckpointFiles:
  """The tensors of a Hugging Face model directory: one `model.safetensors` (diffusers:
  `diffusion_pytorch_model.safetensors`), or shards + index.

  Keys may carry a prefix that depends on the class that saved them ("model." for *ForCausalLM,
  "text_model." for CLIP, "encoder." for T5); `find_prefix` resolves it from an anchor key.
  """

  STEMS = ("model", "diffusion_pytorch_model")  # transformers' file names, diffusers' file names

  def __init__(self, directory: str, allow_pickle: bool = False):
    self.directory = directory
    self._headers: dict[str, tuple[int, dict]] = {}  # path -> (data offset, header)
    pickle_file = os.path.isfile(directory) and directory.endswith((".bin", ".pt", ".pth"))  # one state dict
    if os.path.isfile(directory) and directory.endswith(".safetensors"):  # one file (an original checkpoint)
      index, single = "", directory
    elif pickle_file:
      index = single = ""
    else:
      stem = next((s for s in self.STEMS if os.path.exists(os.path.join(directory, f"{s}.safetensors.index.json"))
                   or os.path.exists(os.path.join(directory, f"{s}.safetensors"))), self.STEMS[0])
      index = os.path.join(directory, f"{stem}.safetensors.index.json")
      single = os.path.join(directory, f"{stem}.safetensors")
    self._pickle: dict[str, np.ndarray] | None = None
    if os.path.exists(index):
      weight_map = read_json(index)["weight_map"]
      self.key_to_file = {k: os.path.join(directory, v) for k, v in weight_map.items()}
      missing = sorted({p for p in self.key_to_file.values() if not os.path.exists(p)})
      if missing:
        raise FileNotFoundError(f"{index} names shards that do not exist: {missing}. Fix: download the "
                                "complete checkpoint (every shard the index lists).")
    elif os.path.exists(single):
      self.key_to_file = {k: single for k in self._entries(single)}
    else:
      bins = [directory] if pickle_file else sorted(
          os.path.join(directory, n) for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth")))
      if not bins:
        raise FileNotFoundError(f"no model.safetensors, diffusion_pytorch_model.safetensors or their "
                                f".index.json in {directory}.")
      if not allow_pickle:
        raise ValueError(f"{directory} holds only pickle checkpoints ({', '.join(map(os.path.basename, bins))}), "
                         "which can run code when loaded. Fix: convert them to safetensors, or pass allow_pickle=True "
                         "(CLI: --allow-pickle) to load them with torch's weights_only mode.")
      self._pickle = self._load_pickle(bins)
      self.key_to_file = {k: "<pickle>" for k in self._pickle}
    self._open: dict[str, object] = {}  # safe_open handles, only for dtypes DTYPES lacks
    self.prefix = ""
    self.used: set[str] = set()

  @staticmethod
  def _load_pickle(paths: Sequence[str]) -> dict[str, np.ndarray]:
    import torch  # only on explicit request: pickle checkpoints need torch to unpickle
    out = {}
    for p in paths:
      try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
      except pickle.UnpicklingError as e:  # weights_only met something besides tensors: nothing of it ran
        boilerplate = ("Weights only load failed", "Please file", "Check the documentation")
        why = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith(boilerplate)]
        raise UserError(f"{p} was refused as unsafe to load: torch's weights_only loader accepts tensors only and "
                        f"rejected it ({why[0] if why else type(e).__name__}); nothing in it was run. Fix: convert it "
                        "to safetensors with a tool you trust, in a sandbox, or download the model's .safetensors "
                        "files") from e
      except (RuntimeError, EOFError) as e:  # a truncated zip, an empty file
        raise UserError(f"cannot read {p}: {e}. Fix: the file is truncated or not a PyTorch checkpoint; download or "
                        "copy it again (its .safetensors files, if the model has them)") from e
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
    raise NotFound(f"{self.directory}: none of {list(anchors)} found among {len(self.key_to_file)} tensors "
                   f"(first few: {self.keys()[:5]}). Is this the right kind of model?")

  def resolve(self, key: Key) -> str | None:
    """The stored key: under the prefix, else at the root (a head beside the prefixed model, as
    CLIPTextModelWithProjection keeps text_projection beside text_model.)."""
    keys = (key,) if isinstance(key, str) else key
    for k in [self.prefix + k for k in keys] + list(keys):
      if k in self.key_to_file:
        return k
    return None

  def _entries(self, path: str) -> dict:
    """The header entries of one file: key -> {dtype, shape, data_offsets}."""
    if path not in self._headers:
      try:
        with safe_open(path, "np") as f:  # safetensors validates the header (offsets, sizes) on open
          f.keys()
      except Exception as e:  # SafetensorError is no OSError: a truncated or corrupt file is the user's to fix
        raise UserError(f"cannot read {path}: {e}. Fix: the file is truncated or not a safetensors file; "
                        "download or copy it again") from e
      self._headers[path] = _read_header(path)
    return self._headers[path][1]

  def read(self, key: str, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor `key`, read with plain file reads (nothing is mapped) into `out` where `out` has its
    shape and dtype (a buffer to reuse), else into a new 64-byte aligned array."""
    self.used.add(key)
    if self._pickle is not None:
      return self._pickle[key]
    path = self.key_to_file[key]
    entry = self._entries(path)[key]
    if entry["dtype"] not in DTYPES:
      if path not in self._open:
        self._open[path] = safe_open(path, "np")
      return self._open[path].get_tensor(key)
    begin, end = entry["data_offsets"]
    shape, dtype = tuple(entry["shape"]), np.dtype(DTYPES[entry["dtype"]])
    if out is None or out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
      out = aligned_empty(shape, dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    assert view.nbytes == end - begin, (key, entry)  # checked by safe_open's validation
    with open(path, "rb", buffering=0) as f:
      f.seek(self._headers[path][0] + begin)
      done = 0
      while done < view.nbytes:  # one read() returns at most ~2 GB
        n = f.readinto(view[done:])
        if not n:
          raise EOFError(f"{path}: file ends inside tensor {key}")
        done += n
    return out

  def dtype(self, key: str) -> np.dtype | None:
    """The stored dtype of `key` (None for a dtype only safetensors' own reader handles)."""
    if self._pickle is not None:
      return self._pickle[key].dtype
    name = self._entries(self.key_to_file[key])[key]["dtype"]
    return np.dtype(DTYPES[name]) if name in DTYPES else None

  def shape(self, key: str) -> tuple[int, ...]:
    if self._pickle is not None:
      return tuple(self._pickle[key].shape)
    return tuple(self._entries(self.key_to_file[key])[key]["shape"])

  def unused(self) -> list[str]:
    return sorted(set(self.key_to_file) - self.used)


class ConversionError(ValueError):
  pass


@dataclasses.dataclass
class Conversion:
  """A checkpoint checked against a module's parameters (names and shapes only, nothing read): `run` streams them.
  A family's subclass builds it (`checked`) and may narrow `unused` to the keys that are its own."""
  source: str
  cfg: Any
  module: Any
  files: "CheckpointFiles"
  expected: dict
  plan: dict
  resolved: dict

  @classmethod
  def checked(cls, source: str, cfg, module, files: "CheckpointFiles", expected: dict, plan: "Plan", what: str,
              fix: str):
    """The conversion of `expected` ({path: shape}: the module's parameters), refused (ConversionError naming
    `what` tensors and `fix`) when a tensor matches no parameter."""
    conv = cls(source, cfg, module, files, expected, plan, check_plan(plan, files, expected))
    unused = conv.unused()
    if unused:
      raise ConversionError(f"{source}: {len(unused)} {what} tensors match no parameter of its config: {unused[:8]}. "
                            f"Fix: {fix}")
    return conv

  @classmethod
  def prepare(cls, path: str, dtype=jnp.float32):
    """A diffusers model folder, or a pipeline folder holding it in the subclass's SUBFOLDER, checked: the
    subclass's module is its conversion family (config_from_diffusers, make_module, abstract_params,
    plan(cfg, expected)), CLASS its diffusers class, WHAT what errors call it."""
    return cls.of_folder(path, cls.SUBFOLDER, cls.CLASS, sys.modules[cls.__module__], dtype, cls.WHAT)

  @classmethod
  def of_folder(cls, path: str, subfolder: str, class_name: str, fam, dtype, what: str):
    """`prepare` with everything given."""
    path = component_dir(os.path.expanduser(os.fspath(path)), subfolder, class_name)
    cfg = read_component_config(path, class_name, fam.config_from_diffusers)
    module = fam.make_module(cfg, dtype)
    expected = flatten_shapes(strip_boxes(fam.abstract_params(module)))
    return cls.checked(path, cfg, module, CheckpointFiles(path), expected, fam.plan(cfg, expected), what,
                       "check the config against the weights")

  def run(self, dtype, progress: bool = False, **kw) -> dict:
    """build_params over the plan (kw: as_numpy, sink)."""
    return build_params(self.plan, self.files, self.expected, dtype, progress=progress, resolved=self.resolved, **kw)

  def unused(self) -> list[str]:
    """Tensors no parameter reads (`checked` refuses any)."""
    planned = {k for names in self.resolved.values() for k in names}
    return sorted(set(self.files.keys()) - planned)


def _set(tree: dict, path: tuple[str, ...], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def check_plan(plan: Plan, files: CheckpointFiles,
               expected: Mapping[tuple[str, ...], jax.ShapeDtypeStruct]) -> dict[tuple[str, ...], list[str]]:
  """{path: checkpoint keys} of every planned parameter, without reading any tensor. Raises one
  ConversionError naming every unplanned parameter, missing key and mis-shaped tensor."""
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
  return resolved


def build_params(plan: Plan, files: CheckpointFiles, expected: Mapping[tuple[str, ...], jax.ShapeDtypeStruct],
                 dtype, shardings: Mapping[tuple[str, ...], jax.sharding.Sharding] | None = None,
                 progress: bool = False, as_numpy: bool = False,
                 sink: Callable[[tuple[str, ...], object], None] | None = None,
                 resolved: Mapping[tuple[str, ...], list[str]] | None = None) -> dict:
  """Stream every planned tensor into a nested params dict of jax Arrays (in `dtype`).

  `expected` gives each path's shape (from `jax.eval_shape` of the module's init). All missing keys and
  mis-shaped tensors are gathered and reported together, by name, before anything is read.
  `as_numpy=True` returns host numpy arrays instead (64-byte aligned, C-contiguous, in `dtype`), for a
  caller that only writes them out (the convert CLI): nothing is placed on a device. It takes no
  `shardings`. `sink(path, value)`, where given, receives each parameter as soon as it is complete (a
  writer can start on it while the next ones convert), and the returned dict leaves it out.
  `resolved` is check_plan's result when the caller has already checked the plan.
  """
  if as_numpy and shardings:
    raise ValueError("build_params: as_numpy=True returns host arrays; it takes no shardings.")
  resolved = resolved if resolved is not None else check_plan(plan, files, expected)

  np_dtype = np.dtype(jnp.dtype(dtype))
  params: dict = {}
  items = list(plan.items())
  if progress:
    items = tqdm(items, desc="converting", unit="tensor")
  transform = _Transforms()
  for path, src in items:
    want = tuple(expected[path].shape)
    names = resolved[path]
    per_layer = want[1:] if src.stacked else want
    if src.stacked:
      host = aligned_empty(want, np_dtype)
      scratch = None  # one read buffer for all layers of a stack: copied into `host` before the next read
      for i, name in enumerate(names):
        if files.dtype(name) == np_dtype and transform.is_reshape(src.transform, files.shape(name)):
          layer = host[i].reshape(files.shape(name))  # a view: read straight into the stack
          arr = files.read(name, layer)
          if arr is layer:  # (a pickle checkpoint returns its own array: copied below)
            continue
        else:
          arr = scratch = files.read(name, scratch)
        arr = transform(src.transform, arr)
        assert tuple(arr.shape) == per_layer, (name, arr.shape, per_layer)  # checked above
        host[i] = arr  # casts in place, one layer at a time
        del arr
      del scratch
    else:
      arr = transform(src.transform, files.read(names[0]))
      assert tuple(arr.shape) == per_layer, (names[0], arr.shape, per_layer)  # checked above
      host = np.asarray(arr, np_dtype)
      del arr
      if host.ctypes.data % ALIGN or not host.flags.c_contiguous:  # so device_put adopts it, no copy
        host = _aligned_copy(host)
    sharding = shardings.get(path) if shardings else None
    if as_numpy:
      value = host
    elif sharding is None:
      value = jax.device_put(host)
    else:
      value = jax.make_array_from_callback(want, sharding, lambda idx, h=host: h[idx])
    del host
    if sink is None:
      _set(params, path, value)
    else:
      sink(path, value)
    del value
  return params


def _aligned_copy(x: np.ndarray) -> np.ndarray:
  out = aligned_empty(x.shape, x.dtype)
  out[...] = x
  return out


def _is_relabel(eqn, var) -> bool:
  """Whether one jaxpr equation of `var` only relabels the dimensions of C-ordered data (a view)."""
  if list(eqn.invars) != [var] or len(eqn.outvars) != 1:
    return False
  before, after = tuple(var.aval.shape), tuple(eqn.outvars[0].aval.shape)
  name = eqn.primitive.name
  if name == "reshape":
    return eqn.params.get("dimensions") is None
  if name in ("squeeze", "expand_dims", "broadcast_in_dim"):  # adds or drops unit dimensions only
    return [d for d in before if d != 1] == [d for d in after if d != 1]
  return False


class _Transforms:
  """Applies a Source's transform. A transform that only reshapes (its jaxpr is a chain of reshapes)
  runs in numpy, where it is a view, and a stack reads such a tensor straight into its layer
  (`is_reshape`). Other layout transforms of float tensors (transposes) run jitted on the CPU backend
  (XLA transposes bf16 ~3x faster than numpy's strided copy); the result is a read-only numpy view of
  the XLA output. Anything else, or a transform that jax cannot trace, runs in numpy as written."""
  JAX_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))

  def __init__(self):
    self.cpu = jax.devices("cpu")[0]
    self.jitted: dict = {}
    self.reshapes: dict = {}

  def is_reshape(self, fn, shape: tuple[int, ...]) -> bool:
    """Whether `fn` of a C-contiguous array of `shape` is a pure reshape (a view, same bytes, same order)."""
    if fn is _identity:
      return True
    key = (fn, tuple(shape))
    if key not in self.reshapes:
      try:
        closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(shape, jnp.float32))
      except Exception:  # noqa: BLE001  not traceable by jax: treat as a general transform
        self.reshapes[key] = False
      else:
        jaxpr, ok = closed.jaxpr, not closed.consts
        var = jaxpr.invars[0] if len(jaxpr.invars) == 1 else None
        for eqn in jaxpr.eqns:
          ok = ok and _is_relabel(eqn, var)
          var = eqn.outvars[0]
        self.reshapes[key] = bool(ok and var is not None and list(jaxpr.outvars) == [var])
    return self.reshapes[key]

  def __call__(self, fn, x: np.ndarray) -> np.ndarray:
    if fn is _identity or x.dtype not in self.JAX_DTYPES or x.ndim < 2:
      return fn(x)
    if x.flags.c_contiguous and self.is_reshape(fn, x.shape):
      return fn(x)  # a view
    if fn not in self.jitted:
      self.jitted[fn] = jax.jit(fn)
    f = self.jitted[fn]
    if f is not None:
      try:
        return np.asarray(f(jax.device_put(x, self.cpu)))
      except Exception:  # noqa: BLE001  e.g. a transform written with numpy functions: numpy from now on
        logger.debug("transform %s does not run in jax; using numpy", fn, exc_info=True)
        self.jitted[fn] = None
    return fn(x)


def flatten_shapes(tree) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat[tuple(p.key for p in path)] = leaf
  return flat
