"""Denoiser families, chosen by `model.family`: the one place where a family's name meets its file.

The trainer, sampler, evaluator, planner and parameter report see a family through this contract only. Its
functions receive the family's own section (`section`: the one its CONFIG_DEFAULTS declares, `model` for the DiT,
`unet`) and a `Shared` record of what it reads elsewhere, never the whole config; the functions below hand them over.
  build(section, shared, conditioner, attention) -> Linen module   the trainable denoiser (`attention`: the resolved
      kernel) holding `conditioner` (the module `conditioners.build` made for its context width)
  module.apply({"params": p}, x_BHWC, t_B, feats, valids, prompts, drop_B) -> prediction [B, H, W, C]
      feats / valids / prompts: per text tower, features [B, L, D], validity and prompt (not instruction) masks;
      drop_B: examples whose text is replaced by the unconditional context (classifier-free guidance)
  abstract_inputs(batch, latent_hwc, text_shapes) -> those inputs as ShapeDtypeStructs (eval_shape, compile);
      text_shapes: each tower's feature shape without the batch, (length, ..., width)
  flops_per_example(section, shared, text_shapes, conditioner, conditioner_flops) -> {group: forward FLOPs}
      its own groups (the conditioner's are added here; a family that measures itself by lowering subtracts
      `conditioner_flops`)   (plan, MFU)
  activation_bytes(section, shared, batch, text_shapes, tensor, itemsize, attention) -> bytes kept for the backward
      pass on one device holding `batch` examples, `tensor`-way tensor parallel, `attention` the kernel planned (the
      conditioner's are its own)   (plan)
  param_groups(params) -> {group: subtree}                             (parameter report)
  geometry(section, latent_hwc) -> Geometry   what it derives for others: its unit, token count, context width
  validate(section, latent_hwc)   its own section's checks (configs.validate calls `validate` below; ConfigError
      by name); `section`: the one its CONFIG_DEFAULTS declares (`model` for the DiT, `unet`)
  pretrained_weights(section, shared, path) -> {"denoiser/...": array}   optional: what `model.init` reads besides
      another run's workdir (the U-Net family: a converted diffusers U-Net)
  sample_latent_shape(section, shared, height, width) -> latent hwc   optional: sampling at sizes other than the trained
      one (the U-Net family: any multiple of its unit); without it only data.image_size is sampled
  pipeline_config(base, path) -> config | None   optional: a released pipeline folder of the family (the U-Net
      family: diffusers' Stable Diffusion folders) as the config that samples and fine-tunes it, filled into `base`
      (a base config; `Pipeline.from_pretrained`)
  pipeline_parts(path, dtype) -> {component: (conversion family, conversion)} | None   optional: that folder's
      components checked for conversion (`python -m lidit_jax.convert diffusers`)
  exportable(config, where) -> source folder; export_pipeline(backend, out, save); single_file_state(backend,
      where) -> {key: array}   optional: whether a model of the family is one its released pipelines run (else a
      UserError by name), and the model back in its pipeline folder's layout or in one original single file
      (`python -m lidit_jax.export diffusers`)
  lora_names(section, shared) -> (path, layer) -> [name, ...]   optional: the module names LoRA files give the
      kernel at `path` (layer: of a stack), the first what `export lora` writes (the U-Net family: diffusers'
      `unet.down_blocks.0...`, the original layout's, ComfyUI's); without it `torch_view.module_key`, `export
      safetensors`' name
  lora_tower_prefixes(config) -> {tower name: [prefix, ...]}   optional: the component names LoRA files give a
      text tower's modules (the U-Net family: `text_encoder` / kohya's `te`, `te1`, `te2`); without it the tower's name
  LORA_TARGETS: regexes over kernel names   optional: the kernels `lora.targets=()` gives pairs (its attention
      projections); a conditioner's own are added (conditioners.LORA_TARGETS)
A new family is one file here plus its name below and a config.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

import flax.linen as nn

from lidit_jax import conditioners, lora
from lidit_jax.config_checks import ConfigError, fail, plugin_section

FAMILIES = {"lidit": "lidit_jax.denoisers.lidit", "unet": "lidit_jax.denoisers.unet",
            "pixart": "lidit_jax.denoisers.pixart", "sana": "lidit_jax.denoisers.sana",
            "lumina2": "lidit_jax.denoisers.lumina2"}
DEFAULT = "lidit"  # base_config's choice


class Geometry(NamedTuple):
  """What a family derives for the rest of the code (which never reads a family's own section)."""
  latent_hwc: tuple[int, int, int]  # the denoiser's input at data.image_size
  unit: int  # latent sides must be multiples of this (the DiT's patch; the U-Net's halvings)
  image_tokens: int  # positions the denoiser attends over at data.image_size (flow's resolution shift, kernels)
  context_width: int  # the width of the context a conditioner gives it
  variance: bool = False  # its output is [prediction, learned variance] channels (PixArt's learn_sigma)


class Shared(NamedTuple):
  """What a family reads of the shared sections."""
  latent_hwc: tuple[int, int, int]  # its input at data.image_size (the autoencoder's latents)
  pixel_factor: int  # pixels per latent position (autoencoder.factor)
  dtype: str  # model.dtype
  remat: str  # model.remat
  null: str  # conditioner.null: the unconditional context


def latent_hwc(config) -> tuple[int, int, int]:
  """The denoiser's input at data.image_size: the autoencoder's latents."""
  f = config.autoencoder.factor
  return (config.data.image_size // f, config.data.image_size // f, config.autoencoder.channels)


def geometry(config) -> Geometry:
  module = family(config)
  return module.geometry(plugin_section(config, module), latent_hwc(config))


def shared(config) -> Shared:
  return Shared(latent_hwc(config), config.autoencoder.factor, config.model.dtype, config.model.remat,
                config.conditioner.null)


def lora_targets(config) -> tuple:
  """The default `lora.targets`: the family's and its conditioner's (LORA_TARGETS in their files)."""
  return (*getattr(family(config), "LORA_TARGETS", ()), *getattr(conditioners.conditioner(config), "LORA_TARGETS", ()))


def lora_names(config):
  """(path, layer) -> the module names LoRA files of this family give the kernel at `path`, the written one first."""
  module = family(config)
  if hasattr(module, "lora_names"):
    return module.lora_names(plugin_section(config, module), shared(config))
  return lora.default_names


def lora_tower_prefixes(config) -> dict:
  """{tower name: the prefixes LoRA files give its modules}: the family's (`lora_tower_prefixes`), else none (each
  tower under its own name)."""
  module = family(config)
  return module.lora_tower_prefixes(config) if hasattr(module, "lora_tower_prefixes") else {}


def build(config, attention: str) -> nn.Module:
  """The trainable denoiser of `model.family` with its conditioner, `attention` the resolved kernel."""
  module = family(config)
  cond = conditioners.build(config, geometry(config).context_width)
  return module.build(plugin_section(config, module), shared(config), cond, attention)


def flops_per_example(config, text_shapes) -> dict:
  """{group: forward FLOPs of one example}: the family's groups and the conditioner's."""
  module, width = family(config), geometry(config).context_width
  cond = conditioners.flops_per_example(config, text_shapes, width)
  own = module.flops_per_example(plugin_section(config, module), shared(config), text_shapes,
                                 conditioners.build(config, width), cond)
  return {**own, "conditioner": cond}


def activation_bytes(config, batch: int, text_shapes, tensor: int, itemsize: int, attention: str) -> int:
  """Bytes the train step keeps for the backward pass on one device of `batch` examples: the family's and its
  conditioner's. `attention`: the kernel model.attention resolves to on the planned chip."""
  module = family(config)
  own = module.activation_bytes(plugin_section(config, module), shared(config), batch, text_shapes, tensor, itemsize,
                                attention)
  return own + conditioners.activation_bytes(config, batch, text_shapes, geometry(config).context_width, tensor)


def pretrained_weights(config, path: str) -> dict | None:
  """What `model.init` = `path` gives the family when it is no training workdir (a converted diffusers U-Net), or
  None when the family reads nothing else."""
  module = family(config)
  if not hasattr(module, "pretrained_weights"):
    return None
  return module.pretrained_weights(plugin_section(config, module), shared(config), path)


def sample_latent_shape(config, height: int, width: int) -> tuple[int, int, int]:
  """Latents for sampling at height x width: any size the family takes, else only data.image_size."""
  module = family(config)
  if hasattr(module, "sample_latent_shape"):
    return module.sample_latent_shape(plugin_section(config, module), shared(config), height, width)
  size = config.data.image_size
  if (height, width) != (size, size):
    raise ValueError(f"height x width {height} x {width}: this model was trained at {size} x {size} px. "
                     "Fix: leave them unset")
  return latent_hwc(config)


def validate(config) -> None:
  """The family's own checks, then the image size against its unit (times the autoencoder's factor)."""
  module = family(config)
  module.validate(plugin_section(config, module), latent_hwc(config))
  own, factor, size = geometry(config).unit, config.autoencoder.factor, config.data.image_size
  unit = own * factor
  if size % unit:
    fail("data.image_size", size, f"not divisible by the denoiser's unit x autoencoder factor = {own} x {factor} = "
         f"{unit} (model.family={config.model.get('family', DEFAULT)!r})",
         f"use an image size that is a multiple of {unit}, e.g. {unit * max(1, round(size / unit))}")


def family(config) -> ModuleType:
  name = config.model.get("family", "lidit")
  if name not in FAMILIES:
    raise ConfigError(f"config model.family={name!r} is not a denoiser family. Fix: set "
                      f"--config.model.family to one of {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[name])


def pipeline_parts(path: str, dtype) -> dict | None:
  """{component: (conversion family, checked conversion)} of a pipeline folder some family reads, else None."""
  for name in FAMILIES:
    module = importlib.import_module(FAMILIES[name])
    parts = module.pipeline_parts(path, dtype) if hasattr(module, "pipeline_parts") else None
    if parts is not None:
      return parts
  return None


def pipeline_config(base, path: str):
  """The config of a pipeline folder of any family that reads one (None when none does), from `base` (a copy of
  configs.base_config(): each family fills in its own)."""
  for name in FAMILIES:
    module = importlib.import_module(FAMILIES[name])
    config = module.pipeline_config(base.copy_and_resolve_references(), path) if hasattr(module, "pipeline_config") else None
    if config is not None:
      return config
  return None
