"""One rule for every output a command writes (exports, conversions, datasets, caches, sample images).

  with outputs.staged(OUT, ours=is_pipeline_folder, what="a diffusers pipeline folder") as tmp:
    write everything under tmp                  # a file or a directory: whatever the command makes
  # now OUT is complete; before this line it was absent or the previous output, never half of each

The output is written under a temporary name beside the target (`.NAME.tmp-PID`, same filesystem, so the final
rename is atomic) and renamed into place when complete. An existing target is replaced only when it is a previous
output of the same command (`ours(path)`), an empty directory, or `overwrite=True` (`--overwrite`); anything else
is refused by name before a byte is written. A full disk, a read-only directory or a missing permission is one
`OutputError` naming the directory, the bytes needed and free, and the fix; the temporary output is removed.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Callable

from lidit_jax.cli import UserError


class OutputError(UserError, OSError):
  """An output could not be written (a full disk, a read-only directory, a target that is not ours)."""


def temporary_name(target: str, tag: str = "tmp") -> str:
  target = os.path.abspath(target)
  return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{tag}-{os.getpid()}")


def _exists(path: str) -> bool:
  return os.path.lexists(path)


def check_target(target: str, overwrite: bool = False, ours: Callable[[str], bool] | None = None,
                 what: str = "output", flag: str = "--overwrite") -> None:
  """Refuse an existing `target` that is not ours (nor empty) unless `overwrite`."""
  if not _exists(target) or overwrite:
    return
  if os.path.isdir(target) and not os.path.islink(target):
    if not os.listdir(target) or (ours is not None and ours(target)):
      return
    raise OutputError(f"{target} already exists and is not {what}; writing there would replace what it holds. "
                      f"Fix: choose a new path, or pass {flag} to replace it")
  if ours is not None and ours(target):
    return
  raise OutputError(f"{target} already exists. Fix: choose a new path, or pass {flag} to replace it")


def check_apart(target: str, sources, allow_inside: bool = False) -> None:
  """Refuse a `target` that is one of `sources` or holds one (replacing it would delete what is being read) or,
  unless `allow_inside`, lies inside one (it would write into the source); before a byte is written."""
  t = os.path.realpath(target)
  for src in sources:
    s = os.path.realpath(src)
    within = lambda a, b: os.path.commonpath([a, b]) == b  # a is b or under it
    if within(s, t):
      raise OutputError(f"{target} {'is' if s == t else 'holds'} the source {src}: replacing it would delete what "
                        f"is being read. Fix: choose an output path outside {src}")
    if within(t, s) and not allow_inside:
      raise OutputError(f"{target} lies inside the source {src}: the output would be written into the source. "
                        f"Fix: choose an output path outside {src}")


def remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif _exists(path):
    with contextlib.suppress(OSError):
      os.remove(path)


def make_parent(target: str) -> str:
  """Create the directory that will hold `target` (named in the error when that fails)."""
  parent = os.path.dirname(os.path.abspath(target))
  try:
    os.makedirs(parent, exist_ok=True)
  except FileExistsError as e:  # makedirs found a file where the directory should be
    raise explain(NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), parent), parent) from e
  except OSError as e:
    raise explain(e, parent) from e
  return parent


def preflight(target: str, overwrite: bool = False, ours: Callable[[str], bool] | None = None,
              what: str = "output", flag: str = "--overwrite") -> None:
  """What `staged` would refuse, checked before a long computation: the target, its directory (made here) and
  that a file can be created in it."""
  check_target(target, overwrite, ours, what, flag)
  parent = make_parent(target)
  try:
    fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.probe-", dir=parent)
  except OSError as e:
    raise explain(e, parent) from e
  os.close(fd)
  os.remove(probe)


def check_space(directory: str, need_bytes: float, what: str = "the output") -> None:
  """Refuse before writing when `directory`'s filesystem has less free space than `need_bytes`."""
  free = shutil.disk_usage(directory).free
  if free < need_bytes:
    raise OutputError(f"not enough space in {directory} for {what}: it needs about {_mib(need_bytes)}, "
                      f"{_mib(free)} are free. Fix: free space there, or write to another directory")


def _mib(n: float) -> str:
  return f"{n / 2 ** 20:.1f} MiB"


def _errno_of(e: BaseException) -> int | None:
  """The errno of `e` or what caused it; libraries that wrap OSErrors in their own types (safetensors' Rust
  `IoError(Os { code: 28, ... })`, Orbax's threads) keep it only in their text."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.errno
    text = str(e)
    for code, words in ((errno.ENOSPC, ("No space left", "code: 28")),
                        (errno.EROFS, ("Read-only file system", "code: 30")),
                        (errno.EACCES, ("Permission denied", "code: 13")),
                        (errno.ENOTDIR, ("Not a directory", "code: 20"))):
      if any(w in text for w in words):
        return code
    e = e.__cause__ or e.__context__
  return None


def explain(e: BaseException, directory: str, need_bytes: float | None = None) -> BaseException:
  """`e` as an OutputError naming `directory` and the fix when it is a disk or permission failure, else `e`."""
  code = _errno_of(e)
  if code == errno.ENOSPC:
    free = shutil.disk_usage(directory).free if os.path.isdir(directory) else 0
    need = f"it needs about {_mib(need_bytes)}, " if need_bytes else ""
    return OutputError(f"the disk holding {directory} is full ({need}{_mib(free)} free); nothing half-written "
                       "was left behind. Fix: free space there, or write to another directory")
  if code in (errno.EROFS, errno.EACCES, errno.EPERM):
    why = "is on a read-only filesystem" if code == errno.EROFS else "is not writable by this user"
    return OutputError(f"cannot write in {directory}: it {why}. Fix: choose a writable directory")
  if code == errno.ENOTDIR:
    return OutputError(f"cannot write in {directory}: a part of that path is a file, not a directory. Fix: "
                       "choose a path under a directory")
  return e


@contextlib.contextmanager
def staged(target: str, overwrite: bool = False, ours: Callable[[str], bool] | None = None,
           what: str = "output", need_bytes: float | None = None, flag: str = "--overwrite"):
  """Yield a temporary path beside `target`; when the block ends without error, rename it to `target` (the old
  target goes only once the new one is in place). On any error the temporary path is removed."""
  target = os.path.abspath(target)
  check_target(target, overwrite, ours, what, flag)
  parent = make_parent(target)
  if need_bytes:
    check_space(parent, need_bytes, what)
  tmp = temporary_name(target)
  remove(tmp)  # a leftover of a process with our pid, long dead
  try:
    yield tmp
    if not _exists(tmp):
      raise FileNotFoundError(f"{tmp}: nothing was written")
    commit(tmp, target)
  except BaseException as e:
    remove(tmp)
    if isinstance(e, Exception):
      raised = explain(e, parent, need_bytes)
      if raised is not e:
        raise raised from e
    raise


def commit(tmp: str, target: str) -> None:
  """Rename the complete `tmp` to `target`; an existing target is moved aside first and deleted after."""
  if not _exists(target):
    os.rename(tmp, target)
    return
  if not os.path.isdir(target) and not os.path.isdir(tmp):
    os.replace(tmp, target)  # a file: one atomic step
    return
  old = temporary_name(target, "old")
  remove(old)
  os.rename(target, old)
  try:
    os.rename(tmp, target)
  except BaseException:
    os.rename(old, target)  # put the previous output back
    raise
  remove(old)
