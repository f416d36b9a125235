import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(**overrides):
  """configs/shapes.py:tiny, with dotted-key overrides (tests build from the real config, shrunk)."""
  from lidit_jax import configs
  c = configs.load_config_file(str(ROOT / "configs" / "shapes.py") + ":tiny")
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return configs.validate(c)


@pytest.fixture
def config():
  return tiny_config()
