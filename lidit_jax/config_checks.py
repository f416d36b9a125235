"""The form of every config refusal: `ConfigError` naming the value, why it cannot work, and the fix. A leaf
module (it imports only `cli`), so the registries and their members can check their own sections without
importing `configs`, which imports them."""
from __future__ import annotations

from typing import NoReturn

from lidit_jax.cli import UserError


class ConfigError(UserError, ValueError):
  """A config value that cannot work (a ValueError too, for callers that catch those)."""


def fail(key, value, why, fix) -> NoReturn:
  raise ConfigError(f"config {key}={value!r}: {why}. Fix: {fix}.")


def one_of(key, value, options):
  if value not in options:
    fail(key, value, f"must be one of {sorted(options)}", f"set --config.{key} to one of them")
