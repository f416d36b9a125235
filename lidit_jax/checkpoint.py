"""Orbax checkpoints of a run: items `state` (train state), `data` (iterator state), `config` (JSON).

Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when complete,
so a crash during a save never touches the last good checkpoint. `restore` returns None when the
workdir holds no checkpoint yet.
"""
from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp
from etils import epath


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; a bucket URL (gs://...) is kept as it is, a local path made absolute."""
  root = workdir if "://" in workdir else os.path.abspath(workdir)
  return str(epath.Path(root) / "checkpoints")


class Checkpoints:
  def __init__(self, workdir: str, keep: int = 3, save_every: int = 1, keep_every: int = 0):
    """Keeps the last `keep` checkpoints, plus every step divisible by `keep_every` (if > 0) for good."""
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "config"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                             keep_period=keep_every or None))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config, force: bool = False) -> bool:
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))

  def restore(self, abstract_state, step: int | None = None):
    """(state, data_state) of `step` (default: latest), or None if there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def require(workdir: str) -> "Checkpoints":
  """Open a workdir that must hold a checkpoint, with a clear error when it does not."""
  directory = checkpoint_dir(workdir)
  ckpt = Checkpoints(workdir) if epath.Path(directory).is_dir() else None
  if ckpt is None or ckpt.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {directory}. Fix: train first "
                            f"(python -m lidit_jax.train --config ... --workdir {workdir}) or pass the right --workdir.")
  return ckpt
