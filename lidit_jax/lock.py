"""A workdir has one writer: `WORKDIR/.lock` names the process that holds it (host, pid, command, start time).

  with lock.held(workdir, "train"):   # refused with the holder's host and pid while another process holds it
    ...

The holder touches the file every `HEARTBEAT_S` seconds. A lock whose process is dead (same host: the pid is gone;
another host sharing the filesystem: no heartbeat for `STALE_S` seconds) is taken over with a warning. Multi-host
runs share one lock, taken by process 0. Buckets (gs://...) have no lock: Orbax's own step directories are the
only guard there.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

from lidit_jax import outputs
from lidit_jax.cli import UserError, warn

NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class LockedError(UserError):
  """Another live process holds the workdir."""


def _path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), NAME)


def _read(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # being written, or garbage: judged by its age


def _alive(info: dict, path: str) -> bool:
  """Whether the process `info` names still runs."""
  if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
    try:
      os.kill(info["pid"], 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      return True  # another user's live process
    return True
  try:
    return time.time() - os.path.getmtime(path) < STALE_S
  except FileNotFoundError:
    return False


def holder(workdir: str) -> dict | None:
  """The live process holding `workdir` ({host, pid, command, started}), or None."""
  if "://" in workdir:
    return None
  path = _path(workdir)
  info = _read(path)
  if info is None or not _alive(info, path):
    return None
  return info


def describe(info: dict) -> str:
  return (f"`{info.get('command', '?')}` (pid {info.get('pid', '?')} on host {info.get('host', '?')}, since "
          f"{info.get('started', '?')})")


def refuse_if_held(path: str, what: str) -> None:
  """For commands that write `path` (exports, conversions): refuse while a trainer holds it, or the directory it is
  written into (an export beside a run's checkpoints)."""
  path = os.path.abspath(path)
  for directory in (path, os.path.dirname(path)):
    info = holder(directory) if os.path.isdir(directory) else None
    if info is not None:
      raise LockedError(f"{directory} is a workdir held by {describe(info)}; {what} there would race with it. Fix: "
                        "wait for that run to end (or stop it), or write somewhere else")


class WorkdirLock:
  def __init__(self, workdir: str, command: str):
    self.path = _path(workdir)
    self.info = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    self._stop = threading.Event()
    self._thread = None

  def acquire(self) -> "WorkdirLock":
    for _ in range(10):  # a takeover races with other takers: each try either creates the file or reads a holder
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      except OSError as e:  # a read-only filesystem, a directory not ours
        raise outputs.explain(e, os.path.dirname(self.path)) from e
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(self.info, f)
      self._thread = threading.Thread(target=self._beat, daemon=True, name="lidit-workdir-lock")
      self._thread.start()
      return self
    raise LockedError(f"could not take the lock {self.path} (other processes keep taking it). Fix: make sure one "
                      "process at a time uses this workdir")

  def _take_over_if_stale(self):
    """Refuse a live holder; move a dead one's lock away (only one taker wins the rename of the same file)."""
    info = _read(self.path)
    where = os.path.dirname(self.path)
    if info is not None and _alive(info, self.path):
      if info.get("pid") == os.getpid() and info.get("host") == self.info["host"]:
        raise LockedError(f"{where} is already held by this process ({describe(info)}). Fix: finish the first run "
                          "before starting another in the same workdir")
      raise LockedError(f"{where} is in use by {describe(info)}. Fix: wait for that run to end (or stop it), or "
                        f"pass another --workdir; if that process is gone for good, delete {self.path}")
    stale = f"{self.path}.stale-{os.getpid()}"
    try:
      os.rename(self.path, stale)
    except FileNotFoundError:
      return
    os.remove(stale)
    warn(f"{where} was locked by {describe(info or {})}, which is no longer running: taking the lock over")

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self):
    self._stop.set()
    if _read(self.path) == self.info:  # ours still: never delete a lock another process took over
      with contextlib.suppress(OSError):
        os.remove(self.path)


@contextlib.contextmanager
def held(workdir: str, command: str, enabled: bool = True):
  """Hold `workdir` for the block (`enabled=False`: another process of the same run holds it)."""
  if not enabled or "://" in workdir:
    yield None
    return
  lock = WorkdirLock(workdir, command).acquire()
  try:
    yield lock
  finally:
    lock.release()
