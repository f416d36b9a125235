"""diffusers `UNet2DConditionModel` folders -> `models.unet.UNet2DConditionModel` (no torch: safetensors with numpy).

`load_unet(path, dtype)` takes a U-Net folder (config.json + diffusion_pytorch_model*.safetensors) or a pipeline
folder holding one in `unet/`. Our Flax names mirror diffusers' keys (`down_blocks_0/attentions_1/
transformer_blocks_0/attn2/to_k` is `down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`), so the plan is
derived from the module's own parameter tree; conv kernels go OIHW -> HWIO, linear ones [out, in] -> [in, out].
Config fields the module does not implement are refused by name rather than converted wrongly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.cli import NotFound
from lidit_jax.convert import registry
from lidit_jax.convert import safetensors_io as io
from lidit_jax.models import unet

Config = unet.UNetConfig
_INDEXED = re.compile(r"(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|to_out|net)"
                      r"_(\d+)")
# (config field, the value our module implements): anything else is refused
_FIXED = {"act_fn": "silu", "resnet_time_scale_shift": "default", "mid_block_type": "UNetMidBlock2DCrossAttn",
          "class_embed_type": None, "encoder_hid_dim_type": None, "time_embedding_type": "positional",
          "time_cond_proj_dim": None, "num_class_embeds": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
          "center_input_sample": False, "dual_cross_attention": False, "timestep_post_act": None,
          "attention_type": "default", "reverse_transformer_layers_per_block": None, "cross_attention_norm": None,
          "mid_block_scale_factor": 1, "downsample_padding": 1, "time_embedding_dim": None,
          "time_embedding_act_fn": None, "class_embeddings_concat": False, "mid_block_only_cross_attention": None}


def config_from_diffusers(d: dict, where: str = "config.json") -> unet.UNetConfig:
  name = d.get("_class_name", "UNet2DConditionModel")
  if name != "UNet2DConditionModel":
    raise ValueError(f"{where}: _class_name {name!r} is not a UNet2DConditionModel. Fix: point at a U-Net folder "
                     "(a pipeline's unet/)")
  for key, value in _FIXED.items():
    if key in d and d[key] != value and not (value is None and d[key] in (None, False)):
      raise ValueError(f"{where}: {key}={d[key]!r} is not supported (only {value!r}). Fix: use an SD 1.x / 2.x / XL "
                       "U-Net, or extend models/unet.py")
  if d.get("only_cross_attention") not in (None, False) and any(np.atleast_1d(d["only_cross_attention"])):
    raise ValueError(f"{where}: only_cross_attention is not supported")
  if d.get("addition_embed_type") not in (None, "text_time"):
    raise ValueError(f"{where}: addition_embed_type={d['addition_embed_type']!r} is not supported (None or 'text_time')")
  n = len(d.get("block_out_channels", unet.UNetConfig.block_out_channels))
  per_block = lambda v: tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * n
  base = unet.UNetConfig()
  get = lambda k, default=None: d.get(k) if d.get(k) is not None else (default if default is not None else getattr(base, k))
  return unet.UNetConfig(
      in_channels=get("in_channels"), out_channels=get("out_channels"),
      block_out_channels=tuple(get("block_out_channels")), down_block_types=tuple(get("down_block_types")),
      up_block_types=tuple(get("up_block_types")), layers_per_block=int(get("layers_per_block")),
      num_heads=per_block(d.get("num_attention_heads") or d.get("attention_head_dim") or 8),
      transformer_layers_per_block=per_block(get("transformer_layers_per_block", 1)),
      cross_attention_dim=int(np.max(get("cross_attention_dim"))), norm_num_groups=get("norm_num_groups"),
      norm_eps=float(get("norm_eps")), use_linear_projection=bool(get("use_linear_projection", False)),
      upcast_attention=bool(d.get("upcast_attention") or False), flip_sin_to_cos=bool(get("flip_sin_to_cos", True)),
      freq_shift=int(get("freq_shift", 0)) if d.get("freq_shift") is not None else 0,
      addition_embed_type=d.get("addition_embed_type"), addition_time_embed_dim=d.get("addition_time_embed_dim"),
      projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim"),
      sample_size=int(get("sample_size")))


def make_module(cfg: unet.UNetConfig, dtype) -> unet.UNet2DConditionModel:
  return unet.UNet2DConditionModel(cfg, dtype)


def abstract_inputs(cfg: unet.UNetConfig, batch: int = 1, size: int | None = None, text_length: int = 4) -> dict:
  """The U-Net's call arguments as ShapeDtypeStructs (any spatial size divisible by the downsampling builds it)."""
  sds = jax.ShapeDtypeStruct
  s = size or 2 ** (len(cfg.block_out_channels) - 1) * 2
  out = dict(x_BHWC=sds((batch, s, s, cfg.in_channels), jnp.float32), t_B=sds((batch,), jnp.float32),
             ctx_BSD=sds((batch, text_length, cfg.cross_attention_dim), jnp.float32))
  if cfg.addition_embed_type == "text_time":
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    out.update(text_embeds=sds((batch, pooled), jnp.float32), time_ids=sds((batch, 6), jnp.float32))
  return out


def abstract_params(module: unet.UNet2DConditionModel):
  return jax.eval_shape(lambda kw: module.init(jax.random.key(0), **kw), abstract_inputs(module.cfg))["params"]


def torch_key(path: tuple[str, ...]) -> str:
  """Our parameter path -> its diffusers state-dict key."""
  *mods, leaf = path
  names = [_INDEXED.sub(lambda m: f"{m.group(1)}.{m.group(2)}", p) if _INDEXED.fullmatch(p) else p for p in mods]
  return ".".join(names) + "." + {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]


def _kernel(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T  # conv OIHW -> HWIO, Linear [out, in] -> [in, out]


def plan(expected: dict) -> dict:
  """{param path: Source} in diffusers' naming. A 1x1 conv projection (SD 1.x's proj_in / proj_out) is a 4-D
  kernel here as there; a linear one (SD 2.x / XL) 2-D in both."""
  return {path: io.Source.one(torch_key(path), _kernel if path[-1] == "kernel" else io._identity)
          for path in expected}


@dataclasses.dataclass
class Conversion:
  """A U-Net folder checked against our module (names and shapes only): `run` streams its parameters."""
  source: str
  cfg: unet.UNetConfig
  module: unet.UNet2DConditionModel
  files: io.CheckpointFiles
  expected: dict
  plan: dict
  resolved: dict

  @classmethod
  def prepare(cls, path: str, dtype=jnp.float32) -> "Conversion":
    path = io.component_dir(path, "unet", "UNet2DConditionModel")
    where = os.path.join(path, "config.json")
    if not os.path.exists(where):
      raise NotFound(f"{where} does not exist. Fix: point at a diffusers U-Net folder")
    with open(where, encoding="utf-8") as f:
      cfg = config_from_diffusers(json.load(f), where)
    module, files = make_module(cfg, dtype), io.CheckpointFiles(path)
    expected = io.flatten_shapes(registry.strip_boxes(abstract_params(module)))
    plan_ = plan(expected)
    conv = cls(path, cfg, module, files, expected, plan_, io.check_plan(plan_, files, expected))
    planned = {k for names in conv.resolved.values() for k in names}
    unused = sorted(set(files.keys()) - planned)
    if unused:
      raise io.ConversionError(f"{path}: {len(unused)} U-Net tensors match no parameter of its config: "
                               f"{unused[:8]}. Fix: check config.json against the weights")
    return conv

  def run(self, dtype, progress: bool = False, **kw) -> dict:
    return io.build_params(self.plan, self.files, self.expected, dtype, progress=progress, resolved=self.resolved,
                           **kw)


def load_unet(path: str, dtype=jnp.float32):
  """(UNet2DConditionModel module, params) from a diffusers U-Net or pipeline folder; parameters in `dtype`,
  which the module computes in."""
  conv = Conversion.prepare(path, dtype)
  return conv.module, conv.run(dtype)
