"""Converted text models on disk: Orbax params + the family and config as JSON + the tokenizer files.

Layout of OUT (from `python -m lidit_jax.convert hf-text SRC OUT`):
  params/                  Orbax checkpoint of the parameter tree (stored in the conversion dtype)
  config.json, tokenizer*  copied from SRC, so OUT also serves as a tokenizer directory
  lidit_text_model.json    family, model config, source, dtype; written last, so a half-written OUT is
                           never mistaken for a finished one
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lidit_jax.convert import hf_text

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")


def save_converted(out: str, src: str, fam, cfg, params, dtype) -> None:
  out = os.path.abspath(out)
  if os.path.exists(os.path.join(out, hf_text.CONVERTED_MARKER)) or os.path.exists(os.path.join(out, "params")):
    raise FileExistsError(f"{out} already holds a converted model. Fix: choose a new OUT directory or delete it.")
  os.makedirs(out, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out, "params"), params)
  ckptr.wait_until_finished()
  for name in sorted(os.listdir(src)):  # config + tokenizer files, never weights
    full = os.path.join(src, name)
    if os.path.isfile(full) and not name.endswith(WEIGHT_SUFFIXES) and not name.endswith(".index.json"):
      shutil.copy2(full, os.path.join(out, name))
  desc = {**hf_text.describe(fam, cfg), "source": os.path.abspath(src), "dtype": jnp.dtype(dtype).name}
  tmp = os.path.join(out, hf_text.CONVERTED_MARKER + ".tmp")
  with open(tmp, "w") as f:
    json.dump(desc, f, indent=2)
  os.replace(tmp, os.path.join(out, hf_text.CONVERTED_MARKER))


def load_converted(path: str, dtype=jnp.float32, mesh=None, rules=()):
  """(module, params) of a converted directory, restored straight into `dtype` and the mesh's shardings."""
  with open(os.path.join(path, hf_text.CONVERTED_MARKER)) as f:
    fam, cfg, module = hf_text.from_description(json.load(f), dtype)
  abstract = hf_text.abstract_params(module)
  if mesh is not None:
    from lidit_jax import sharding
    shardings = sharding.fit_to_shapes(abstract, mesh, rules)
  else:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
                        hf_text.strip_boxes(abstract), hf_text.strip_boxes(shardings))
  params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"), target)
  return module, params
