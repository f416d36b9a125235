"""Converted text models on disk: Orbax params + the family and config as JSON + the tokenizer files.

Layout of OUT (from `python -m lidit_jax.convert hf-text SRC OUT`):
  params/                  Orbax checkpoint (OCDBT, uncompressed) of the parameter tree, stored in the
                           conversion dtype; `StandardCheckpointer().restore` reads it
  config.json, tokenizer*  copied from SRC, so OUT also serves as a tokenizer directory
  lidit_converted.json     family, model config, source, dtype; written last, so a half-written OUT is
                           never mistaken for a finished one (and the CLI writes OUT under a temporary name
                           beside it, renamed when complete: Orbax's files hold no absolute paths)

Writing: leaves go to Orbax as host numpy arrays, written from their own buffers (no copy). The CLI
streams (`stream_converted`): Orbax starts on a tree of placeholders (`PendingArray`) and writes each
parameter as soon as the converter finishes it, then lets it go, so disk writes overlap conversion and
the whole tree is never in memory at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import shutil
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from lidit_jax import sharding
from lidit_jax.cli import NotFound
from lidit_jax.convert import registry, safetensors_io as io

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")


class PendingArray:
  """A parameter of known shape and dtype whose data comes later (`set`). Saved through `ParamsWriter`,
  it is written as soon as it is set, while the parameters after it are still being converted."""

  def __init__(self, shape, dtype):
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    self.ndim, self.size = len(self.shape), math.prod(self.shape)
    self.nbytes = self.size * self.dtype.itemsize
    self._ready: concurrent.futures.Future = concurrent.futures.Future()
    self._value = None

  @property
  def done(self) -> bool:
    return self._ready.done()

  def set(self, value) -> None:
    value = np.asarray(value)
    if value.shape != self.shape or value.dtype != self.dtype:
      raise ValueError(f"expected {self.shape} {self.dtype}, got {value.shape} {value.dtype}")
    self._value = value
    self._ready.set_result(None)

  def fail(self, exc: BaseException) -> None:
    if not self._ready.done():
      self._ready.set_exception(exc)

  async def take(self) -> np.ndarray:
    """The data, once set; this leaf lets go of it (the writer holds it only while writing)."""
    await asyncio.wrap_future(self._ready)
    value, self._value = self._value, None
    return value


class _HostArrayHandler(ocp.type_handlers.NumpyHandler):
  """Orbax's handler for numpy leaves (same format, typestr 'np.ndarray'), writing from the caller's
  buffer without a defensive copy, and waiting for `PendingArray` leaves to be set."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _open_and_write(self, value, tspec, ts_context):
    if isinstance(value, PendingArray):
      value = await value.take()
    await super()._open_and_write(value, tspec, ts_context)


# Streaming needs the (private) per-array write step of Orbax's numpy handler; without it, leaves are all
# converted first and saved together, still without copies.
CAN_STREAM = callable(getattr(ocp.type_handlers.NumpyHandler, "_open_and_write", None))


def _handler() -> ocp.PyTreeCheckpointHandler:
  """No compression: zstd output buffers stay in memory until the write commits (a second copy of the tree
  at worst), and a restore would pay for decompression every time."""
  host = _HostArrayHandler()
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, host), (PendingArray, host),
      (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))  # unused; keeps array metadata on
  return ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)


def save_params(directory: str, params) -> None:
  """Write a parameter tree as an Orbax (OCDBT) checkpoint that `StandardCheckpointer.restore` reads.

  Leaves are written as host numpy arrays straight from their buffers: no defensive copy (Orbax's default
  for numpy leaves, and its device-to-host copy for jax Arrays, each hold a second copy of the tree while
  it saves). jax Arrays on the CPU are viewed as numpy without a copy; sharded ones are gathered. The
  caller must not modify the arrays while this runs.
  """
  params = jax.tree.map(np.asarray, params)
  with ocp.Checkpointer(_handler()) as ckptr:
    ckptr.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(params))


class ParamsWriter:
  """Writes a parameter tree while it is being built: `put(path, array)` as each parameter is complete,
  then `finish()`. Orbax starts at once on a tree of `PendingArray`s (shapes from `shapes`, {path:
  anything with .shape and .dtype}) and writes each leaf when it arrives, so disk writes overlap the
  conversion of the next parameters; a written leaf is let go. Same checkpoint as `save_params`.
  Without streaming support (CAN_STREAM false) the leaves are kept and saved by `finish()`.
  """

  def __init__(self, directory: str, shapes: Mapping[tuple[str, ...], object]):
    self.directory = os.path.abspath(directory)
    self.pending = {path: PendingArray(s.shape, s.dtype) for path, s in shapes.items()}
    self.ckptr = None
    if CAN_STREAM:
      self.ckptr = ocp.AsyncCheckpointer(_handler())
      self.ckptr.save(self.directory, args=ocp.args.PyTreeSave(traverse_util.unflatten_dict(dict(self.pending))))

  def put(self, path: tuple[str, ...], value) -> None:
    self.pending[path].set(value)

  def finish(self) -> None:
    missing = ['/'.join(p) for p, leaf in self.pending.items() if not leaf.done]
    if missing:
      raise ValueError(f"ParamsWriter.finish: parameters never put: {missing}")
    if self.ckptr is None:
      save_params(self.directory, traverse_util.unflatten_dict({p: leaf._value for p, leaf in self.pending.items()}))
    else:
      try:
        self.ckptr.wait_until_finished()
      finally:
        self.ckptr.close()
    self.pending = {}

  def abort(self, exc: BaseException) -> None:
    """After a failed conversion: stop the writer and remove what it wrote."""
    for leaf in self.pending.values():
      leaf.fail(exc)
    if self.ckptr is not None:
      try:
        self.ckptr.wait_until_finished()
        self.ckptr.close()
      except Exception:  # noqa: BLE001  the failure we caused, or a writer already closed by finish()
        pass
      self.ckptr = None
    parent, name = os.path.split(self.directory)
    for entry in os.listdir(parent) if os.path.isdir(parent) else ():
      if entry == name or entry.startswith(name + ".orbax-checkpoint-tmp"):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _claim(out: str) -> str:
  out = os.path.abspath(out)
  if registry.marker(out) or os.path.exists(os.path.join(out, "params")):
    raise FileExistsError(f"{out} already holds a converted model. Fix: choose a new OUT directory or delete it.")
  os.makedirs(out, exist_ok=True)
  return out


def _finish(out: str, src: str, fam, cfg, dtype) -> None:
  """Config and tokenizer files, then the marker, last."""
  for name in sorted(os.listdir(src)) if os.path.isdir(src) else ():  # config + tokenizer files, never weights
    full = os.path.join(src, name)
    if os.path.isfile(full) and not name.endswith(WEIGHT_SUFFIXES) and not name.endswith(".index.json"):
      shutil.copy2(full, os.path.join(out, name))
  desc = {**registry.describe(fam, cfg), "source": os.path.abspath(src), "dtype": jnp.dtype(dtype).name}
  tmp = os.path.join(out, registry.MARKER + ".tmp")
  with open(tmp, "w") as f:
    json.dump(desc, f, indent=2)
  os.replace(tmp, os.path.join(out, registry.MARKER))


def save_converted(out: str, src: str, fam, cfg, params, dtype) -> None:
  """Write OUT (see the module docstring) from a finished tree of numpy arrays or jax Arrays."""
  out = _claim(out)
  save_params(os.path.join(out, "params"), params)
  _finish(out, src, fam, cfg, dtype)


def stream_converted(out: str, src: str, fam, cfg, dtype, shapes: Mapping[tuple[str, ...], object],
                     produce: Callable[[Callable], object]):
  """Write OUT while the parameters are being converted: `produce(sink)` must call `sink(path, array)`
  once for every path of `shapes` ({path: anything with .shape and .dtype}), e.g.
  `lambda sink: build_params(..., as_numpy=True, sink=sink)`. Returns what `produce` returns. If it
  fails, nothing of OUT/params is left behind."""
  new = not os.path.exists(out)
  out = _claim(out)
  writer = ParamsWriter(os.path.join(out, "params"), shapes)
  try:
    result = produce(writer.put)
    writer.finish()
  except BaseException as e:
    writer.abort(e)
    if new and not os.listdir(out):
      os.rmdir(out)
    raise
  _finish(out, src, fam, cfg, dtype)
  return result


def load_converted(path: str, dtype=jnp.float32, mesh=None, rules=()):
  """(module, params) of a converted directory, restored straight into `dtype` and the mesh's shardings."""
  fam, cfg, module = registry.from_description(registry.read_marker(path), dtype)
  abstract = fam.abstract_params(module)
  if mesh is not None:
    shardings = sharding.fit_to_shapes(abstract, mesh, rules)
  else:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
                        registry.strip_boxes(abstract), registry.strip_boxes(shardings))
  params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"), target)
  return module, params


def load_or_convert(path: str, family: str, what: str, conversion, dtype=jnp.float32):
  """(module, params) of our converted directory of `family` at `path`, or of the diffusers folder there converted
  in memory (`conversion`: its io.Conversion class); a pipeline folder (ours too) gives its component's, another
  family's directory is refused, naming `what`."""
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path) and getattr(conversion, "SUBFOLDER", None):
    path = io.component_dir(path, conversion.SUBFOLDER, conversion.CLASS)
  if os.path.isdir(path) and registry.marker(path):
    kind = registry.read_marker(path)["family"]
    if kind != family:
      raise NotFound(f"{path} holds a converted {kind} model, not a {what}. Fix: point at a {what}")
    return load_converted(path, dtype)
  conv = conversion.prepare(path, dtype)
  return conv.module, conv.run(dtype)
