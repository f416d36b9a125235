"""Conditioners, chosen by `conditioner.kind`: tower features -> the context the denoiser cross-attends to.

The contract a denoiser family calls (and nothing else does):
  build(config, width) -> Linen module   `width`: the context width the backbone reads
  module(feats, valids, prompts, t_emb_BD) -> (context [B, S, width], context validity [B, S])
      feats / valids / prompts: per text tower, features [B, L, D], validity and prompt (not instruction)
      masks; t_emb_BD: the denoiser's timestep embedding (refiners conditioned on time read it, others not)
  flops_per_example(config, text_shapes, width) -> forward FLOPs of one example   (plan, MFU)
  validate(config, towers)   its own config checks (configs.validate calls it)
A new conditioner is one file here plus its name below.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Sequence

import jax
import jax.numpy as jnp

from lidit_jax.config_checks import ConfigError

CONDITIONERS = {"refiners": "lidit_jax.conditioners.lidit", "tokens": "lidit_jax.conditioners.tokens"}


def conditioner(config) -> ModuleType:
  name = config.conditioner.kind
  if name not in CONDITIONERS:
    raise ConfigError(f"config conditioner.kind={name!r} is not a conditioner. Fix: set "
                      f"--config.conditioner.kind to one of {sorted(CONDITIONERS)}")
  return importlib.import_module(CONDITIONERS[name])


def context_valid(valids: Sequence[jax.Array], prompts: Sequence[jax.Array], drop_instruction: bool) -> jax.Array:
  """The concatenated context's validity: padding out, and the instruction's tokens too when asked (under jit
  shapes are static: the instruction is masked, never sliced away)."""
  keep = [v.astype(bool) & pm.astype(bool) if drop_instruction else v.astype(bool) for v, pm in zip(valids, prompts)]
  return jnp.concatenate(keep, axis=1)
