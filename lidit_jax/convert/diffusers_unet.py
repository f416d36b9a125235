"""diffusers `UNet2DConditionModel` folders -> `models.unet.UNet2DConditionModel` (no torch: safetensors with numpy).

`load_unet(path, dtype)` takes a U-Net folder (config.json + diffusion_pytorch_model*.safetensors) or a pipeline
folder holding one in `unet/`. Our Flax names mirror diffusers' keys (`down_blocks_0/attentions_1/
transformer_blocks_0/attn2/to_k` is `down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`), so the plan is
derived from the module's own parameter tree; conv kernels go OIHW -> HWIO, linear ones [out, in] -> [in, out].
Config fields the module does not implement are refused by name rather than converted wrongly.
"""
from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.cli import NotFound
from lidit_jax.convert import orbax_io, registry, safetensors_io as io
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
  layers = d.get("layers_per_block")
  if isinstance(layers, (list, tuple)):  # diffusers takes one count per block; the same count everywhere is an int
    if len(set(layers)) != 1:
      raise ValueError(f"{where}: layers_per_block={list(layers)} (a different resnet count per block) is not "
                       "supported: models/unet.py builds every block with one count. Fix: convert a U-Net with one "
                       "layers_per_block, or extend models/unet.py to take one per block")
    d = {**d, "layers_per_block": int(layers[0])}
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


_kernel = io.with_inverse(  # conv OIHW <-> HWIO, Linear [out, in] <-> [in, out]
    lambda w: w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T,
    lambda k: k.transpose(3, 2, 0, 1) if k.ndim == 4 else k.T)


def plan(expected: dict) -> dict:
  """{param path: Source} in diffusers' naming. A 1x1 conv projection (SD 1.x's proj_in / proj_out) is a 4-D
  kernel here as there; a linear one (SD 2.x / XL) 2-D in both."""
  return {path: io.Source.one(torch_key(path), _kernel if path[-1] == "kernel" else io._identity)
          for path in expected}


# ---------------------------------------------------------------- the original single-file layout (CompVis LDM / A1111)

LDM_PREFIX = "model.diffusion_model."
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def ldm_modules(cfg: unet.UNetConfig) -> dict[str, str]:
  """{diffusers module: original module}. The original numbers its down path `input_blocks.i` (conv_in, then per
  block its resnet (+ attention) pairs and a downsampler), its up path `output_blocks.i` likewise (the upsampler
  beside the block's last resnet), and the mid block's resnet / attention / resnet `middle_block.0..2`."""
  m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
       "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
       "mid_block.resnets.1": "middle_block.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
  n, per = len(cfg.block_out_channels), cfg.layers_per_block
  i = 1
  for b in range(n):
    for j in range(per):
      m[f"down_blocks.{b}.resnets.{j}"], m[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.0", f"input_blocks.{i}.1"
      i += 1
    if b < n - 1:
      m[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
      i += 1
  i = 0
  for b in range(n):
    for j in range(per + 1):
      m[f"up_blocks.{b}.resnets.{j}"], m[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.0", f"output_blocks.{i}.1"
      i += 1
    if b < n - 1:
      m[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i - 1}.{2 if cfg.up_block_types[b] == unet.UP_BLOCKS[0] else 1}.conv"
  return m


def ldm_key(key: str, modules: dict[str, str]) -> str:
  """A diffusers U-Net key in the original naming (without `LDM_PREFIX`); transformers' inner names agree."""
  parts = key.split(".")
  for cut in range(min(5, len(parts) - 1), 0, -1):  # the longest module prefix
    head = ".".join(parts[:cut])
    if head in modules:
      rest = parts[cut:]
      if ".resnets." in head:
        rest[0] = _LDM_RESNET.get(rest[0], rest[0])
      return ".".join([modules[head], *rest])
  raise KeyError(f"{key} has no place in the original U-Net layout")


def ema_key(key: str) -> str:
  """An original file keeps its EMA copy under `model_ema.` with the module path's dots dropped."""
  return "model_ema." + key[len("model."):].replace(".", "")


# Head counts are not in the tensors: SD 1.x has 8 per block, SD 2.x and XL 64 channels per head.
KINDS = {"sd15": dict(heads=lambda w: 8, sample_size=64), "sd2": dict(heads=lambda w: w // 64, sample_size=96),
         "sdxl": dict(heads=lambda w: w // 64, sample_size=128)}


def infer_config(files: io.CheckpointFiles, kind: str) -> unet.UNetConfig:
  """An original file's U-Net from its tensor shapes; `kind` (KINDS) gives what shapes do not hold."""
  keys = [k[len(LDM_PREFIX):] for k in files.keys() if k.startswith(LDM_PREFIX)]
  shape = lambda k: files.shape(LDM_PREFIX + k)
  has = lambda k: LDM_PREFIX + k in files.key_to_file
  index = lambda path: {int(k.split(".")[1]) for k in keys if k.startswith(path + ".")}
  ops = sorted(i for i in index("input_blocks") if has(f"input_blocks.{i}.0.op.weight"))
  per = ops[0] - 1 if ops else len(index("input_blocks")) - 1
  n = len(ops) + 1
  first = [1 + b * (per + 1) for b in range(n)]
  widths = tuple(shape(f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in first)
  down_attn = [has(f"input_blocks.{i}.1.proj_in.weight") for i in first]
  up_attn = [has(f"output_blocks.{b * (per + 1)}.1.proj_in.weight") for b in range(n)]
  depth = lambda path: len({k.split(".")[4] for k in keys if k.startswith(path + ".transformer_blocks.")})
  depths = tuple(depth(f"input_blocks.{i}.1") if a else (depth(f"output_blocks.{(n - 1 - b) * (per + 1)}.1") or 1)
                 for b, (i, a) in enumerate(zip(first, down_attn)))
  attn = next(k for k in keys if k.endswith("attn2.to_k.weight"))
  proj = next(k for k in keys if k.endswith("proj_in.weight"))
  added = has("label_emb.0.0.weight")
  k = KINDS[kind]
  return unet.UNetConfig(
      in_channels=shape("input_blocks.0.0.weight")[1], out_channels=shape("out.2.weight")[0], block_out_channels=widths,
      down_block_types=tuple(unet.DOWN_BLOCKS[0] if a else unet.DOWN_BLOCKS[1] for a in down_attn),
      up_block_types=tuple(unet.UP_BLOCKS[0] if a else unet.UP_BLOCKS[1] for a in up_attn), layers_per_block=per,
      num_heads=tuple(k["heads"](w) for w in widths), transformer_layers_per_block=depths,
      cross_attention_dim=shape(attn)[1], use_linear_projection=len(shape(proj)) == 2,
      addition_embed_type="text_time" if added else None, addition_time_embed_dim=256 if added else None,
      projection_class_embeddings_input_dim=shape("label_emb.0.0.weight")[1] if added else None,
      sample_size=k["sample_size"])


def detect_kind(files: io.CheckpointFiles) -> str:
  """sd15 / sd2 / sdxl from an original file's text-encoder keys (or its U-Net's when it holds only that)."""
  keys = files.keys()
  if any(k.startswith("conditioner.embedders.") for k in keys) or LDM_PREFIX + "label_emb.0.0.weight" in keys:
    return "sdxl"
  if any(k.startswith("cond_stage_model.model.") for k in keys):
    return "sd2"
  if any(k.startswith("cond_stage_model.transformer.") for k in keys):
    return "sd15"
  attn = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
  if attn is None:
    raise NotFound(f"{files.directory} holds no U-Net ({LDM_PREFIX}*). Fix: point at a whole SD checkpoint")
  return "sd2" if files.shape(attn)[1] == 1024 else "sd15"


def ldm_plan(expected: dict, cfg: unet.UNetConfig, ema: bool = False) -> dict:
  """The plan over an original single file: the same layouts, original names (the EMA copy's with `ema`)."""
  modules = ldm_modules(cfg)
  name = lambda path: LDM_PREFIX + ldm_key(torch_key(path), modules)
  return {path: dataclasses.replace(src, keys=((ema_key if ema else str)(name(path)),))
          for path, src in plan(expected).items()}


def to_ldm(cfg: unet.UNetConfig, params) -> dict[str, np.ndarray]:
  """The U-Net's state dict in the original single-file naming (`model.diffusion_model.*`): export."""
  modules = ldm_modules(cfg)
  return {LDM_PREFIX + ldm_key(k, modules): v for k, v in to_diffusers(cfg, params)[1].items()}


class Conversion(io.Conversion):
  """A U-Net folder or original single file checked against our module: `run` streams its parameters."""

  @classmethod
  def prepare(cls, path: str, dtype=jnp.float32, config: str | None = None, kind: str | None = None,
              ema: bool = False) -> "Conversion":
    """`path`: a U-Net or pipeline folder, or an original single file (`model.diffusion_model.*`; its EMA copy
    with `ema`), whose layout `config` (a config.json, or a folder holding one or a unet/) gives, else its
    shapes and `kind` (KINDS; detected from its keys when None)."""
    path = os.path.expanduser(os.fspath(path))
    single = os.path.isfile(path)
    if single:
      io.require_safetensors(path)
      files = io.CheckpointFiles(path)
      if not any(k.startswith(LDM_PREFIX) for k in files.keys()):
        raise NotFound(f"{path} holds no {LDM_PREFIX}* tensors, so it is no original SD checkpoint. Fix: a U-Net "
                       "file in diffusers' naming goes with its config.json: point at its folder")
      if kind is not None and kind not in KINDS:
        raise NotFound(f"kind {kind!r} is not one of {sorted(KINDS)}. Fix: pick one")
      cfg = _read_config(config) if config else infer_config(files, kind or detect_kind(files))
    else:
      path = io.component_dir(path, "unet", "UNet2DConditionModel")
      cfg, files = _read_config(config or path), io.CheckpointFiles(path)
    module = make_module(cfg, dtype)
    expected = io.flatten_shapes(registry.strip_boxes(abstract_params(module)))
    plan_ = ldm_plan(expected, cfg, ema) if single else plan(expected)
    if ema and not any(k.startswith("model_ema.") for k in files.keys()):
      raise NotFound(f"{path} holds no EMA weights (model_ema.*). Fix: convert without --ema")
    return cls.checked(path, cfg, module, files, expected, plan_, "U-Net", "check the config against the weights")

  def unused(self) -> list[str]:
    """U-Net tensors no parameter reads (`prepare` refuses any); in a single file, those of the copy it reads
    (`model.diffusion_model.*`, or the EMA one): its other models are not the U-Net's."""
    planned = {k for names in self.resolved.values() for k in names}
    if os.path.isdir(self.source):
      return sorted(set(self.files.keys()) - planned)
    mine = "model_ema.diffusion_model" if any(k.startswith("model_ema.") for k in planned) else LDM_PREFIX
    return sorted(k for k in self.files.keys() if k.startswith(mine) and k not in planned)


def _read_config(where: str) -> unet.UNetConfig:
  if os.path.isdir(where):
    where = os.path.join(io.component_dir(where, "unet", "UNet2DConditionModel"), "config.json")
  if not os.path.exists(where):
    raise NotFound(f"{where} does not exist. Fix: point at a diffusers U-Net folder or its config.json")
  return config_from_diffusers(io.read_json(where), where)


def load_unet(path: str, dtype=jnp.float32):
  """(UNet2DConditionModel module, params) from a diffusers U-Net or pipeline folder, or our converted directory
  (`python -m lidit_jax.convert diffusers`); parameters in `dtype`, which the module computes in."""
  return orbax_io.load_or_convert(path, "diffusers_unet", "U-Net", Conversion, dtype)


def to_diffusers(cfg: unet.UNetConfig, params) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, state dict) in diffusers' naming and layouts: the inverse of the plan (export)."""
  config = {"_class_name": "UNet2DConditionModel", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "block_out_channels": list(cfg.block_out_channels), "down_block_types": list(cfg.down_block_types),
            "up_block_types": list(cfg.up_block_types), "layers_per_block": cfg.layers_per_block,
            "attention_head_dim": list(cfg.num_heads),  # diffusers' legacy name for the head count
            "transformer_layers_per_block": list(cfg.transformer_layers_per_block),
            "cross_attention_dim": cfg.cross_attention_dim, "norm_num_groups": cfg.norm_num_groups,
            "norm_eps": cfg.norm_eps, "use_linear_projection": cfg.use_linear_projection,
            "upcast_attention": cfg.upcast_attention, "flip_sin_to_cos": cfg.flip_sin_to_cos,
            "freq_shift": cfg.freq_shift, "addition_embed_type": cfg.addition_embed_type,
            "addition_time_embed_dim": cfg.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim,
            "sample_size": cfg.sample_size, **{k: v for k, v in _FIXED.items() if v is not None}}
  params = registry.strip_boxes(params)
  return config, io.to_state_dict(plan(io.flatten_shapes(params)), params)
