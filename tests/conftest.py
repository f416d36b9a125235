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


def _compilation_cache():
  """One persistent XLA compilation cache for the session and its subprocesses: the tiny config's train step
  and sampler are compiled once, not once per test (set before jax is imported)."""
  import atexit
  import os
  import shutil
  import tempfile
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lidit_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)


_compilation_cache()
