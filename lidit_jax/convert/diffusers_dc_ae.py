"""diffusers `AutoencoderDC` folders (Sana's DC-AE) -> `models.dc_ae.AutoencoderDC`.

Our module names mirror diffusers' keys (`down_blocks_3_1/attn/to_qkv_multiscale_0` is `down_blocks.3.1.attn.
to_qkv_multiscale.0`), so the plan is derived from the module's own parameter tree; conv kernels go OIHW -> HWIO
(grouped ones too), linear ones [out, in] -> [in, out]. Config values the module does not implement (batch norm,
no shortcuts) are refused by name. `to_diffusers` is the inverse (export).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.convert import orbax_io, registry, safetensors_io as io
from lidit_jax.models import dc_ae

Config = dc_ae.DCAEConfig
CLASS = "AutoencoderDC"
_INDEXED = re.compile(r"(down_blocks|up_blocks)_(\d+)_(\d+)|(to_qkv_multiscale)_(\d+)")
# (config field, the value our module implements): anything else is refused
_FIXED = {"decoder_norm_types": "rms_norm", "encoder_out_shortcut": True, "decoder_in_shortcut": True,
          "decoder_conv_act_fn": "relu"}


def config_from_diffusers(d: dict, where: str = "config.json") -> Config:
  if d.get("_class_name", CLASS) != CLASS:
    raise ValueError(f"{where}: _class_name {d.get('_class_name')!r} is not an {CLASS}. Fix: point at a DC-AE "
                     "folder (a Sana pipeline's vae/)")
  base = Config()
  n = len(d.get("encoder_block_out_channels", base.encoder_block_out_channels))
  per_block = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
  for key, value in _FIXED.items():
    if key in d and any(v != value for v in (per_block(d[key]) if isinstance(value, str) else (d[key],))):
      raise ValueError(f"{where}: {key}={d[key]!r} is not supported (only {value!r}). Fix: use a Sana DC-AE, or "
                       "extend models/dc_ae.py")
  get = lambda k: d[k] if d.get(k) is not None else getattr(base, k)
  blocks = lambda k: tuple(per_block(get(k)))
  scales = lambda k: tuple(tuple(s) for s in get(k))
  cfg = Config(in_channels=int(get("in_channels")), latent_channels=int(get("latent_channels")),
               attention_head_dim=int(get("attention_head_dim")),
               encoder_block_types=blocks("encoder_block_types"), decoder_block_types=blocks("decoder_block_types"),
               encoder_block_out_channels=tuple(get("encoder_block_out_channels")),
               decoder_block_out_channels=tuple(get("decoder_block_out_channels")),
               encoder_layers_per_block=tuple(get("encoder_layers_per_block")),
               decoder_layers_per_block=tuple(get("decoder_layers_per_block")),
               encoder_qkv_multiscales=scales("encoder_qkv_multiscales"),
               decoder_qkv_multiscales=scales("decoder_qkv_multiscales"),
               upsample_block_type=d.get("upsample_block_type") or "pixel_shuffle",
               downsample_block_type=d.get("downsample_block_type") or "pixel_unshuffle",
               decoder_act_fns=blocks("decoder_act_fns"), scaling_factor=float(d.get("scaling_factor") or 1.0))
  for kind in (*cfg.encoder_block_types, *cfg.decoder_block_types):
    if kind not in ("ResBlock", "EfficientViTBlock"):
      raise ValueError(f"{where}: block type {kind!r} is not supported (ResBlock, EfficientViTBlock)")
  return cfg


def make_module(cfg: Config, dtype) -> dc_ae.AutoencoderDC:
  return dc_ae.AutoencoderDC(cfg, dtype)


def abstract_params(module: dc_ae.AutoencoderDC):
  side = module.cfg.downsample_factor * 2
  x = jax.ShapeDtypeStruct((1, side, side, module.cfg.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)["params"]


def torch_key(path: tuple[str, ...]) -> str:
  """Our parameter path -> its diffusers state-dict key."""
  *mods, leaf = path
  dotted = lambda m: ".".join(g for g in m.groups() if g is not None)
  names = [_INDEXED.sub(dotted, p) if _INDEXED.fullmatch(p) else p for p in mods]
  return ".".join(names) + "." + {"kernel": "weight"}.get(leaf, leaf)


_kernel = io.with_inverse(  # conv OIHW <-> HWIO (grouped: [out, in / groups, k, k]), Linear [out, in] <-> [in, out]
    lambda w: w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T,
    lambda k: k.transpose(3, 2, 0, 1) if k.ndim == 4 else k.T)


def plan(cfg: Config, expected: dict) -> dict:
  """{our parameter path: Source} in diffusers' naming, from the module's own parameter tree (`expected`)."""
  return {path: io.Source.one(torch_key(path), _kernel if path[-1] == "kernel" else io._identity) for path in expected}


class Conversion(io.Conversion):
  """A DC-AE folder (or a pipeline's vae/): `prepare(path, dtype)` checks it
  against our module, `run` streams its parameters."""
  SUBFOLDER, CLASS, WHAT = "vae", CLASS, "DC-AE"


def read_config(where: str) -> Config:
  return io.read_component_config(where, CLASS, config_from_diffusers)


def load(path: str, dtype=jnp.float32):
  """(module, params) from a diffusers DC-AE or pipeline folder, or our converted directory."""
  return orbax_io.load_or_convert(path, "diffusers_dc_ae", "DC-AE", Conversion, dtype)


def to_diffusers(cfg: Config, params) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, state dict) in diffusers' naming and layouts: the inverse of the plan (export)."""
  config = {"_class_name": CLASS, "in_channels": cfg.in_channels, "latent_channels": cfg.latent_channels,
            "attention_head_dim": cfg.attention_head_dim, "encoder_block_types": list(cfg.encoder_block_types),
            "decoder_block_types": list(cfg.decoder_block_types),
            "encoder_block_out_channels": list(cfg.encoder_block_out_channels),
            "decoder_block_out_channels": list(cfg.decoder_block_out_channels),
            "encoder_layers_per_block": list(cfg.encoder_layers_per_block),
            "decoder_layers_per_block": list(cfg.decoder_layers_per_block),
            "encoder_qkv_multiscales": [list(s) for s in cfg.encoder_qkv_multiscales],
            "decoder_qkv_multiscales": [list(s) for s in cfg.decoder_qkv_multiscales],
            "upsample_block_type": cfg.upsample_block_type, "downsample_block_type": cfg.downsample_block_type,
            "decoder_act_fns": list(cfg.decoder_act_fns), "scaling_factor": cfg.scaling_factor, **_FIXED}
  params = registry.strip_boxes(params)
  return config, io.to_state_dict(plan(cfg, io.flatten_shapes(params)), params)
