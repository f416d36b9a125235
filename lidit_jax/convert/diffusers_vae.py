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
from safetensors import numpy as safetensors_numpy  # save_file looked up per call (tests patch it)

from lidit_jax.cli import NotFound
from lidit_jax.convert import orbax_io, registry, safetensors_io as io
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


Config = vae.VAEConfig


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


_kernel = io.with_inverse(lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))  # OIHW <-> HWIO
# Linear [out, in] (or an original file's 1x1 conv [out, in, 1, 1]) -> [in, out]; exported as diffusers' Linear
_dense = io.with_inverse(lambda w: w.reshape(w.shape[0], w.shape[1]).T, lambda k: k.T)


def ldm_name(key: str, num_blocks: int) -> str:
  """A diffusers VAE key in the original (CompVis LDM / A1111) naming; the decoder's blocks count upwards from
  the lowest resolution in diffusers and from the highest in the original."""
  key = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.", key)
  for diffusers_part, ldm_part in _LDM_PARTS:
    key = re.sub(diffusers_part, ldm_part, key)
  return key


_LDM_PARTS = (  # (diffusers pattern, original), applied in order
    (r"^encoder\.down_blocks\.", "encoder.down."), (r"\.resnets\.(\d+)\.", r".block.\1."),
    (r"\.downsamplers\.0\.", ".downsample."), (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."), (r"\.mid_block\.block\.0\.", ".mid.block_1."),
    (r"\.mid_block\.block\.1\.", ".mid.block_2."), (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."), (r"\.attn_1\.to_([qkv])\.", r".attn_1.\1."),
    (r"\.attn_1\.to_out\.0\.", ".attn_1.proj_out."), (r"\.conv_norm_out\.", ".norm_out."),
)


def plan(expected: dict[tuple[str, ...], object], num_blocks: int | None = None) -> dict[tuple[str, ...], io.Source]:
  """{param path: Source} in diffusers' naming, or the original one when `num_blocks` is given."""
  p = {}
  for path, shape in expected.items():
    key = ".".join(_torch_name(n) for n in path[:-1])
    leaf = path[-1]
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    if num_blocks is not None:
      keys = (ldm_name(f"{key}.{suffix}", num_blocks),)
    else:
      keys = (f"{key}.{suffix}",)
      for now, before in _OLD_ATTENTION.items():
        if key.endswith(".attentions.0." + now):
          keys += (f"{key[:-len(now)]}{before}.{suffix}",)
    transform = io._identity if leaf != "kernel" else _dense if len(shape.shape) == 2 else _kernel
    p[path] = io.Source.one(keys if len(keys) > 1 else keys[0], transform)
  return p


def infer_config(files: io.CheckpointFiles) -> vae.VAEConfig:
  """An original file's layout from its tensor shapes; norm groups and the latent factors are SD's defaults
  (shapes do not hold them: pass config= for an SDXL, SD3 or Flux VAE)."""
  shape = lambda k: files.shape(files.prefix + k)
  has = lambda k: files.resolve(k) is not None
  keys = [k[len(files.prefix):] for k in files.keys() if k.startswith(files.prefix)]
  blocks = sorted({int(k.split(".")[2]) for k in keys if k.startswith("encoder.down.")})
  widths = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in blocks)
  per_block = len({k.split(".")[4] for k in keys if k.startswith("encoder.down.0.block.")})
  latent = shape("decoder.conv_in.weight")[1]
  return vae.VAEConfig(in_channels=shape("encoder.conv_in.weight")[1], out_channels=shape("decoder.conv_out.weight")[0],
                       block_out_channels=widths, layers_per_block=per_block, latent_channels=latent,
                       use_quant_conv=has("quant_conv.weight"), use_post_quant_conv=has("post_quant_conv.weight"),
                       mid_block_add_attention=has("encoder.mid.attn_1.q.weight"))


def _read_config(where: str) -> vae.VAEConfig:
  if not os.path.exists(where):
    raise NotFound(f"VAE config {where} does not exist. Fix: pass config= the diffusers config.json of these weights")
  return config_from_diffusers(io.read_json(where), where)


class Conversion(io.Conversion):
  """A VAE checkpoint checked against our module: `run` streams its parameters."""

  @classmethod
  def prepare(cls, path: str, dtype=jnp.float32, config: str | None = None) -> "Conversion":
    path = os.path.expanduser(os.fspath(path))
    if os.path.isfile(path):
      io.require_safetensors(path)
      files = io.CheckpointFiles(path)
      files.find_prefix(("encoder.conv_in.weight",))  # "first_stage_model." in a whole SD checkpoint
      original = files.resolve("encoder.down_blocks.0.resnets.0.conv1.weight") is None
      cfg = _read_config(config) if config else infer_config(files) if original else None
      if cfg is None:
        raise NotFound(f"{path}: a VAE file in diffusers' naming needs config=. Fix: pass its config.json")
    else:
      path = io.component_dir(path, "vae", "AutoencoderKL")
      cfg, files, original = _read_config(config or os.path.join(path, "config.json")), io.CheckpointFiles(path), False
    module = make_module(cfg, dtype)
    expected = io.flatten_shapes(registry.strip_boxes(abstract_params(module)))
    plan_ = plan(expected, len(cfg.block_out_channels) if original else None)
    return cls.checked(path, cfg, module, files, expected, plan_, "VAE",
                       f"pass the config.json these weights were saved with{' (not ' + config + ')' if config else ''}")

  def unused(self) -> list[str]:
    """VAE tensors no parameter reads (a whole SD checkpoint's U-Net and text encoder are not the VAE's)."""
    planned = {k for names in self.resolved.values() for k in names}
    p = self.files.prefix
    vae_keys = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    return sorted(k for k in self.files.keys() if k not in planned
                  and (os.path.isdir(self.source) or (k.startswith(p) and k[len(p):].startswith(vae_keys))))


def load_vae(path: str, dtype=jnp.float32, config: str | None = None):
  """(AutoencoderKL module, params) from a diffusers VAE or pipeline folder, an original single file
  (`first_stage_model.*` keys, or bare `encoder.*` / `decoder.*`) or our converted directory (`python -m
  lidit_jax.convert vae`); see the module docstring. Parameters are stored in `dtype`, which the module computes in."""
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):  # a pipeline folder (ours too): its vae/
    path = io.component_dir(path, "vae", "AutoencoderKL")
  if os.path.isdir(path) and registry.marker(path):
    desc = registry.read_marker(path)
    if desc["family"] != "diffusers_vae":
      raise NotFound(f"{path} holds a converted {desc['family']} model, not a VAE. Fix: point at a VAE")
    return orbax_io.load_converted(path, dtype)
  conv = Conversion.prepare(path, dtype, config)
  return conv.module, conv.run(dtype)


def to_diffusers(cfg: vae.VAEConfig, params) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, state dict) in diffusers' naming and layouts: the inverse of the plan (export)."""
  n = len(cfg.block_out_channels)
  config = {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
            "act_fn": "silu", "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_num_groups,
            "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor,
            "latents_mean": None if cfg.latents_mean is None else list(cfg.latents_mean),
            "latents_std": None if cfg.latents_std is None else list(cfg.latents_std),
            "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
            "mid_block_add_attention": cfg.mid_block_add_attention}
  params = registry.strip_boxes(params)
  return config, io.to_state_dict(plan(io.flatten_shapes(params)), params)


LDM_PREFIX = "first_stage_model."


def to_ldm(cfg: vae.VAEConfig, params) -> dict[str, np.ndarray]:
  """The VAE's state dict in the original single-file naming (`first_stage_model.*`), its mid attention's
  projections as the 1x1 convs the original holds: export."""
  n = len(cfg.block_out_channels)
  out = {}
  for k, v in to_diffusers(cfg, params)[1].items():
    key = ldm_name(k, n)
    out[LDM_PREFIX + key] = v[:, :, None, None] if ".attn_1." in key and key.endswith(".weight") and v.ndim == 2 else v
  return out


def write_diffusers(out: str, cfg: vae.VAEConfig, params) -> str:
  """A diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) of `params`."""
  config, state = to_diffusers(cfg, params)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  safetensors_numpy.save_file(state, os.path.join(out, "diffusion_pytorch_model.safetensors"),
                              metadata={"format": "pt"})
  return out
