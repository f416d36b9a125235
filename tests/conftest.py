import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(**overrides):
  """configs/shapes.py:tiny, with dotted-key overrides (tests build from the real config, shrunk)."""
  from lidit_jax import configs
  c = configs.load_config_file(str(ROOT / "configs" / "shapes.py") + ":tiny")
  return configs.validate(configs.apply_overrides(c, overrides))


@pytest.fixture
def config():
  return tiny_config()
