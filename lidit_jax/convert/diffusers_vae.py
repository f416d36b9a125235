"""diffusers `AutoencoderKL` folders -> `models.vae.AutoencoderKL` (no torch: safetensors read with numpy).

`load_vae(path, dtype, config=None)` takes a VAE folder (config.json + diffusion_pytorch_model*.safetensors) or
a pipeline folder holding one in `vae/`; `config=` names another config.json for the same weights. Our Flax
names mirror diffusers' keys (`down_blocks_0_resnets_1` is `down_blocks.0.resnets.1`), so the plan is derived
from the module's own parameter tree; conv kernels go OIHW -> HWIO, linear ones [out, in] -> [in, out].
Older diffusers saves name the mid-block attention `query` / `key` / `value` / `proj_attn`: read as well.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.cli import NotFound
from lidit_jax.convert import safetensors_io as io
from lidit_jax.models import vae

_SUPPORTED = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
_OLD_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def config_from_diffusers(d: dict, where: str = "config.json") -> vae.VAEConfig:
  name = d.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise ValueError(f"{where}: _class_name {name!r} is not an AutoencoderKL. Fix: point at a VAE folder "
                     "(a pipeline's vae/), not another component")
  for key, kind in _SUPPORTED.items():
    bad = sorted({t for t in d.get(key, ()) if t != kind})
    if bad:
      raise ValueError(f"{where}: {key} {bad} are not supported; AutoencoderKL's VAEs use {kind} only")
  if d.get("act_fn", "silu") != "silu":
    raise ValueError(f"{where}: act_fn {d['act_fn']!r} is not supported (SD / SDXL / SD3 / Flux VAEs use silu)")
  tup = lambda v: None if v is None else tuple(float(x) for x in v)
  base = vae.VAEConfig()
  get = lambda k: d.get(k) if d.get(k) is not None else getattr(base, k)
  return vae.VAEConfig(
      in_channels=get("in_channels"), out_channels=get("out_channels"),
      block_out_channels=tuple(get("block_out_channels")), layers_per_block=get("layers_per_block"),
      latent_channels=get("latent_channels"), norm_num_groups=get("norm_num_groups"),
      use_quant_conv=bool(get("use_quant_conv")), use_post_quant_conv=bool(get("use_post_quant_conv")),
      mid_block_add_attention=bool(get("mid_block_add_attention")), scaling_factor=float(get("scaling_factor")),
      shift_factor=None if d.get("shift_factor") is None else float(d["shift_factor"]),
      latents_mean=tup(d.get("latents_mean")), latents_std=tup(d.get("latents_std")))


def make_module(cfg: vae.VAEConfig, dtype) -> vae.AutoencoderKL:
  return vae.AutoencoderKL(cfg, dtype)


def abstract_params(module: vae.AutoencoderKL):
  """Boxed abstract params (8 px per latent position is enough to build every layer)."""
  size = 8 * module.cfg.downsample_factor
  x = jax.ShapeDtypeStruct((1, size, size, module.cfg.in_channels), jnp.float32)
  return jax.eval_shape(lambda a: module.init(jax.random.key(0), a), x)["params"]


def _torch_name(flax_name: str) -> str:
  # down_blocks_0_resnets_1 -> down_blocks.0.resnets.1; to_out_0 -> to_out.0
  return re.sub(r"(\d)_", r"\1.", re.sub(r"_(\d+)", r".\1", flax_name))


def _kernel(w: np.ndarray) -> np.ndarray:
  if w.ndim == 4:
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return w.T  # Linear [out, in] -> [in, out]


def plan(expected: dict[tuple[str, ...], object]) -> dict[tuple[str, ...], io.Source]:
  p = {}
  for path in expected:
    key = ".".join(_torch_name(n) for n in path[:-1])
    leaf = path[-1]
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    keys = (f"{key}.{suffix}",)
    for now, before in _OLD_ATTENTION.items():
      if key.endswith(".attentions.0." + now):
        keys += (f"{key[:-len(now)]}{before}.{suffix}",)
    p[path] = io.Source.one(keys if len(keys) > 1 else keys[0], _kernel if leaf == "kernel" else io._identity)
  return p


def vae_dir(path: str) -> str:
  """The VAE folder itself: `path`, or its `vae/` subfolder when `path` is a pipeline folder."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(path):
    raise NotFound(f"VAE path {path!r} is not a directory. Fix: point at a diffusers AutoencoderKL folder "
                   "(config.json + diffusion_pytorch_model.safetensors) or a pipeline folder with vae/")
  if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae")):
    return os.path.join(path, "vae")
  return path


def load_vae(path: str, dtype=jnp.float32, config: str | None = None):
  """(AutoencoderKL module, params) from a diffusers VAE folder or pipeline folder; see the module docstring."""
  folder = vae_dir(path)
  where = config or os.path.join(folder, "config.json")
  if not os.path.exists(where):
    raise NotFound(f"no config.json in {folder}. Fix: pass config= the diffusers config.json of these weights")
  with open(where, encoding="utf-8") as f:
    cfg = config_from_diffusers(json.load(f), where)
  module = make_module(cfg, dtype)
  files = io.CheckpointFiles(folder)
  from lidit_jax.convert.hf_text import strip_boxes
  expected = io.flatten_shapes(strip_boxes(abstract_params(module)))
  params = io.build_params(plan(expected), files, expected, dtype)
  unused = files.unused()
  if unused:
    raise io.ConversionError(f"{folder}: {len(unused)} tensors match no parameter of the config in {where}: "
                             f"{unused[:8]}. Fix: pass the config.json these weights were saved with")
  return module, params
