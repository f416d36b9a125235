"""Denoiser families, chosen by `model.family`: the one place where a family's name meets its file.

The trainer, sampler, evaluator, planner and parameter report see a family through this contract only:
  build(config, attention) -> Linen module   the trainable denoiser (`attention`: the resolved kernel), holding
                                             its conditioner (`conditioners`, chosen by conditioner.kind)
  module.apply({"params": p}, x_BHWC, t_B, feats, valids, prompts, drop_B) -> prediction [B, H, W, C]
      feats / valids / prompts: per text tower, features [B, L, D], validity and prompt (not instruction) masks;
      drop_B: examples whose text is replaced by the unconditional context (classifier-free guidance)
  abstract_inputs(batch, latent_hwc, text_shapes) -> those inputs as ShapeDtypeStructs (eval_shape, compile);
      text_shapes: each tower's feature shape without the batch, (length, ..., width)
  flops_per_example(config, latent_hwc, text_shapes) -> {group: forward FLOPs}     (plan, MFU)
  activation_bytes(config, batch, latent_hwc, text_shapes, tensor, itemsize) -> bytes kept for the backward
      pass on one device holding `batch` examples, `tensor`-way tensor parallel   (plan)
  param_groups(params) -> {group: subtree}                             (parameter report)
  geometry(config, latent_hwc) -> Geometry   what it derives for others: its unit, token count, context width
  validate(config, towers)   its own config checks (configs.validate calls it; ConfigError by name)
  pretrained_weights(config, path) -> {"denoiser/...": array}   optional: what `model.init` reads besides another
      run's workdir (the U-Net family: a converted diffusers U-Net)
  sample_latent_shape(config, height, width) -> latent hwc   optional: sampling at sizes other than the trained
      one (the U-Net family: any multiple of its unit); without it only data.image_size is sampled
  pipeline_config(base, path) -> config | None   optional: a released pipeline folder of the family (the U-Net
      family: diffusers' Stable Diffusion folders) as the config that samples and fine-tunes it, filled into `base`
      (a base config; `Pipeline.from_pretrained`)
  exportable(config, where) -> source folder; export_pipeline(backend, out, save); single_file_state(backend,
      where) -> {key: array}   optional: whether a model of the family is one its released pipelines run (else a
      UserError by name), and the model back in its pipeline folder's layout or in one original single file
      (`python -m lidit_jax.export diffusers`)
A new family is one file here plus its name below and a config.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

from lidit_jax.config_checks import ConfigError

FAMILIES = {"lidit": "lidit_jax.denoisers.lidit", "unet": "lidit_jax.denoisers.unet"}
DEFAULT = "lidit"  # base_config's choice


class Geometry(NamedTuple):
  """What a family derives for the rest of the code (which never reads a family's own section)."""
  latent_hwc: tuple[int, int, int]  # the denoiser's input at data.image_size
  unit: int  # latent sides must be multiples of this (the DiT's patch; the U-Net's halvings)
  image_tokens: int  # positions the denoiser attends over at data.image_size (flow's resolution shift, kernels)
  context_width: int  # the width of the context a conditioner gives it


def geometry(config) -> Geometry:
  f = config.autoencoder.factor
  hwc = (config.data.image_size // f, config.data.image_size // f, config.autoencoder.channels)
  return family(config).geometry(config, hwc)


def family(config) -> ModuleType:
  name = config.model.get("family", "lidit")
  if name not in FAMILIES:
    raise ConfigError(f"config model.family={name!r} is not a denoiser family. Fix: set "
                      f"--config.model.family to one of {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[name])


def pipeline_config(base, path: str):
  """The config of a pipeline folder of any family that reads one (None when none does), from `base` (a copy of
  configs.base_config(): each family fills in its own)."""
  for name in FAMILIES:
    module = importlib.import_module(FAMILIES[name])
    config = module.pipeline_config(base.copy_and_resolve_references(), path) if hasattr(module, "pipeline_config") else None
    if config is not None:
      return config
  return None
