"""The conversion families, found by name: what a converted directory records and what rebuilds its module.

A family is a module of `lidit_jax.convert` (hf_llm, hf_t5, hf_clip, diffusers_vae, diffusers_unet) with
`Config` (a frozen dataclass), `make_module(cfg, dtype)` and `abstract_params(module)` (boxed abstract params, from shapes only).
A converted directory holds Orbax params and MARKER: {"family", "config", "source", "dtype"}, written last.
Everything here imports no family until it is asked for, so the families, the Orbax writer and the loaders
all import this module and none of them each other.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from types import ModuleType

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.cli import NotFound
from lidit_jax.convert import safetensors_io as io

FAMILIES = ("hf_llm", "hf_t5", "hf_clip", "diffusers_vae", "diffusers_unet", "diffusers_pixart",
            "diffusers_dc_ae", "diffusers_sana", "diffusers_lumina2")
MARKER = "lidit_converted.json"
LEGACY_MARKERS = ("lidit_text_model.json",)  # text models converted before the VAE joined


def family(name: str) -> ModuleType:
  if name not in FAMILIES:
    raise ValueError(f"unknown conversion family {name!r}; known: {list(FAMILIES)}")
  return importlib.import_module(f"lidit_jax.convert.{name}")


def describe(fam: ModuleType, cfg) -> dict:
  return {"family": fam.__name__.rsplit(".", 1)[-1], "config": dataclasses.asdict(cfg)}


def from_description(desc: dict, dtype):
  """(family, cfg, module) from a marker's description."""
  fam = family(desc["family"])
  cfg = fam.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in desc["config"].items()})
  return fam, cfg, fam.make_module(cfg, dtype)


def marker(directory: str) -> str | None:
  """The marker file of a converted directory, or None for any other directory."""
  for name in (MARKER, *LEGACY_MARKERS):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def read_marker(directory: str) -> dict:
  with open(marker(directory), encoding="utf-8") as f:
    return json.load(f)


strip_boxes = io.strip_boxes  # where the families have always found it


def token_abstract_params(module: nn.Module, max_length: int = 8):
  """A text tower's boxed abstract params (any token count builds every layer)."""
  ids = jax.ShapeDtypeStruct((1, max_length), jnp.int32)
  return jax.eval_shape(lambda i: module.init(jax.random.key(0), i, i), ids)["params"]


def component_config(name: str, path: str, subfolder: str, class_name: str):
  """The config of a diffusers component of family `name` (diffusers_unet, diffusers_vae) from JSON alone: its
  folder, a pipeline folder holding it as `subfolder`, or our converted one."""
  where = io.component_dir(path, subfolder, class_name)
  if marker(where):
    return from_description(read_marker(where), jnp.float32)[1]
  config = os.path.join(where, "config.json")
  if not os.path.exists(config):
    raise NotFound(f"{where} has no config.json. Fix: point at a diffusers {class_name} or pipeline folder")
  return family(name).config_from_diffusers(io.read_json(config), config)
