"""Orbax checkpoints of a run: items `state` (train state), `data` (iterator state), `config` (JSON).

Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when complete,
so a crash during a save never touches the last good checkpoint. A save that fails (a full disk) stops the
run with one message naming the directory, the step and the last good step. `restore` returns None when the
workdir holds no checkpoint yet, refuses a checkpoint whose parameters differ from the config's (before any
compute, naming the first one), and falls back to the newest readable checkpoint when the latest cannot be
read: the damaged one is moved to WORKDIR/checkpoints_damaged/, never deleted.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from lidit_jax.cli import debug_requested, UserError, warn

ITEMS = ("state", "data", "config")


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; a bucket URL (gs://...) is kept as it is, a local path made absolute."""
  root = workdir if "://" in workdir else os.path.abspath(workdir)
  return str(epath.Path(root) / "checkpoints")


class SaveError(UserError):
  """A checkpoint could not be written; the last good one is untouched."""


class _Drop(logging.Filter):
  def __init__(self, predicate):
    super().__init__()
    self.predicate = predicate

  def filter(self, record):
    return not self.predicate(record)


# Orbax logs each failed writer thread with its traceback (hundreds on a full disk), and each file of a damaged
# checkpoint it fails to parse; asyncio then logs the writers' futures whose exceptions nobody retrieved. The
# failure reaches us as an exception and is reported once (a SaveError, or the fallback's warning): without
# --debug those records go.
_ORBAX_FAILURES = _Drop(lambda r: r.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in r.pathname)
_LOST_FUTURES = _Drop(lambda r: "exception was never retrieved" in r.getMessage())


def _drop_closed_loop_errors():
  """After a failed async save, tensorstore's late callbacks find Orbax's event loop closed and each report
  'Event loop is closed' with a traceback (as unraisable exceptions; hundreds on a full disk): noise, as the
  failure itself is reported."""
  if getattr(sys.unraisablehook, "lidit_drops_closed_loop", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  hook.lidit_drops_closed_loop = True
  sys.unraisablehook = hook


def quiet_orbax_failures() -> None:
  """Drop Orbax's per-writer failure logs (unless --debug): the failure reaches us as an exception, reported once."""
  if debug_requested():
    return
  absl_logging.get_absl_logger().addFilter(_ORBAX_FAILURES)
  logging.getLogger("asyncio").addFilter(_LOST_FUTURES)
  _drop_closed_loop_errors()


class Checkpoints:
  def __init__(self, workdir: str, keep: int = 3, save_every: int = 1, keep_every: int = 0):
    """Keeps the last `keep` checkpoints, plus every step divisible by `keep_every` (if > 0) for good."""
    self.directory = checkpoint_dir(workdir)
    quiet_orbax_failures()
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                             keep_period=keep_every or None))
    self._saving = None  # the step of a save in flight, for the message if it fails
    self._failed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config, force: bool = False) -> bool:
    self.wait()  # a failure of the previous (async) save is reported with its own step
    with self._reporting(step):
      self._check_space(state)
      saved = self.manager.save(step, force=force, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))
    self._saving = step if saved else None
    return saved

  def _check_space(self, state):
    """Refuse a save that cannot fit before writing anything: the old checkpoints go only once it is done."""
    if "://" in self.directory:
      return
    last = self.latest_step()  # checkpoints compress: the last one on disk is the better estimate
    if last is not None:
      size = sum(os.path.getsize(os.path.join(root, f))
                 for root, _, files in os.walk(os.path.join(self.directory, str(last))) for f in files)
    else:
      size = sum(x.nbytes for x in jax.tree.leaves(state))
    need = size * 1.05 + 2 ** 20
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise OSError(errno.ENOSPC, f"{free / 2**20:.1f} MiB free, the checkpoint needs about {need / 2**20:.1f} MiB")

  @contextlib.contextmanager
  def _reporting(self, step: int):
    """Turn a failed write of `step` into one SaveError; what the same failure raises later is dropped."""
    try:
      yield
    except SaveError:
      raise
    except Exception as e:
      if self._failed:  # already reported; what the async writers raise after that adds nothing
        return
      self._failed = True
      failed, self._saving = step, None
      good = [s for s in self.manager.all_steps() if s != failed]
      last = f"step {max(good)}" if good else "none yet"
      text = str(e).splitlines()[0] if str(e) else type(e).__name__
      if getattr(e, "errno", None) == errno.ENOSPC and e.strerror:
        why = f"the disk is full: {e.strerror}"
      elif "No space left on device" in str(e) or getattr(e, "errno", None) == errno.ENOSPC:
        why = "the disk is full"
      else:
        why = f"{type(e).__name__}: {text[:300]}"
      raise SaveError(f"saving the checkpoint of step {failed} in {self.directory} failed ({why}); the last good "
                      f"checkpoint is {last}, untouched. Fix: free space (or point --workdir elsewhere) and "
                      "re-run the same command to resume from it") from e

  def check_shapes(self, abstract_state) -> None:
    """Refuse a latest checkpoint whose parameters differ from `abstract_state`'s (metadata only, nothing read)."""
    step = self.latest_step()
    meta = None
    if step is not None:
      with contextlib.suppress(Exception):  # unreadable metadata: restore() deals with a damaged checkpoint
        meta = self.manager.item_metadata(step)["state"]
    if meta is not None:
      check_matches(getattr(meta, "tree", meta), abstract_state, step, self.directory)

  def restore(self, abstract_state, step: int | None = None):
    """(state, data_state) of `step` (default: the newest readable one), or None if there is no checkpoint."""
    steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
    for i, s in enumerate(steps):
      try:
        meta = self.manager.item_metadata(s)["state"]
      except Exception as e:  # unreadable metadata: a damaged checkpoint
        meta, error = None, e
      if meta is not None:
        check_matches(getattr(meta, "tree", meta), abstract_state, s, self.directory)
        try:
          out = self.manager.restore(s, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
          return out.state, out.data
        except Exception as e:
          error = e
      if step is not None:
        raise UserError(f"checkpoint step {s} in {self.directory} cannot be read ({type(error).__name__}: "
                        f"{error}). Fix: restore another step, or delete that step's directory") from error
      moved = self._set_aside(s)
      fallback = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no other checkpoint: starting anew"
      warn(f"checkpoint step {s} in {self.directory} cannot be read ({type(error).__name__}: "
           f"{(str(error).splitlines() or [''])[0][:200]}); moved to {moved}; {fallback}")
    return None

  def _set_aside(self, step: int) -> str:
    """Move a damaged step out of the manager's sight (kept for inspection, never deleted)."""
    src = epath.Path(self.directory) / str(step)
    dst_dir = epath.Path(self.directory).parent / "checkpoints_damaged"
    dst = dst_dir / str(step)
    if jax.process_index() == 0:
      dst_dir.mkdir(parents=True, exist_ok=True)
      n = 1
      while dst.exists():
        dst, n = dst_dir / f"{step}.{n}", n + 1
      src.rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"lidit_jax checkpoint {step} set aside")
    self.manager.reload()
    return str(dst)

  def wait(self):
    if self._saving is None:
      return
    with self._reporting(self._saving):
      self.manager.wait_until_finished()
    self._saving = None

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def check_matches(saved_tree, abstract_state, step: int, directory: str):
  """Refuse a checkpoint whose parameters are not the config's, naming the first one that differs."""
  saved = {param_name(p): m for p, m in jax.tree_util.tree_leaves_with_path(saved_tree)}
  want = {param_name(p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
  fix = ("Fix: resume with the config that wrote it (WORKDIR/config.json), or start the new config in a fresh "
         "--workdir")
  for key, a in want.items():
    m = saved.get(key)
    if m is None:
      raise UserError(f"the checkpoint of step {step} in {directory} has no {key} (the config has it, shape "
                      f"{tuple(a.shape)}): it was written by another model. {fix}")
    if tuple(m.shape) != tuple(a.shape):
      raise UserError(f"the checkpoint of step {step} in {directory} has {key} of shape {tuple(m.shape)}, "
                      f"the config {tuple(a.shape)}: the model changed since it was written. {fix}")
  extra = sorted(set(saved) - set(want))
  if extra:
    raise UserError(f"the checkpoint of step {step} in {directory} has {extra[0]}, which the config does not "
                    f"({len(extra)} such): it was written by another model. {fix}")


def param_name(path) -> str:
  """"a/b/c" of a tree path (dict keys, dataclass fields or indices): how configs name parameters."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def restore_weights(workdir: str, abstract_params, skip=()) -> dict:
  """{name: array} of the EMA weights in the latest checkpoint of another run's `workdir`, for every parameter
  of `abstract_params` (ShapeDtypeStructs with shardings) whose name no `skip` regex matches. A partial restore:
  the optimizer state is never read. A wanted parameter the checkpoint lacks, or holds in another shape, is
  refused by name (fix: skip it, so that it starts from its initialisation)."""
  ckpt = require(workdir)
  step = ckpt.latest_step()
  saved = ckpt.manager.item_metadata(step)["state"]
  saved = getattr(saved, "tree", saved)["ema_params"]
  have = {param_name(p): m for p, m in jax.tree_util.tree_leaves_with_path(saved)}
  want = {param_name(p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract_params)
          if not any(re.search(rx, param_name(p)) for rx in skip)}
  fix = "Fix: add a regex matching it to --config.model.init_skip (it then starts from its initialisation)"
  for name, a in want.items():
    if name not in have:
      raise UserError(f"model.init={workdir!r}: its checkpoint (step {step}) has no parameter {name}. {fix}")
    if tuple(have[name].shape) != tuple(a.shape):
      raise UserError(f"model.init={workdir!r}: parameter {name} has shape {tuple(have[name].shape)} there, "
                      f"{tuple(a.shape)} in this config. {fix}")
  # The wanted parameters only, as the nested dicts they were saved as.
  nest = lambda leaf: traverse_util.unflatten_dict({tuple(n.split("/")): leaf(a) for n, a in want.items()})
  item = nest(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding))
  args = nest(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype))
  manager = ocp.CheckpointManager(ckpt.directory, item_names=("state",),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"ema_params": item}, restore_args={"ema_params": args}, partial_restore=True)))
  manager.close()
  ckpt.close()
  return {param_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(out.state["ema_params"])}


def require(workdir: str) -> "Checkpoints":
  """Open a workdir that must hold a checkpoint, with a clear error when it does not."""
  directory = checkpoint_dir(workdir)
  ckpt = Checkpoints(workdir) if epath.Path(directory).is_dir() else None
  if ckpt is None or ckpt.latest_step() is None:
    raise UserError(f"no checkpoint in {directory}. Fix: train first "
                    f"(python -m lidit_jax.train --config ... --workdir {workdir}) or pass the right --workdir.")
  return ckpt
