"""Conditioners, chosen by `conditioner.kind`: tower features -> the context the denoiser cross-attends to.

Each function of the contract receives the conditioner's own section (the one its CONFIG_DEFAULTS declares:
`model.refiner`, `conditioner.cam`, `conditioner.diff`; None for those without one) and the shared `text` section,
never the whole config; the functions below (`build`, `flops_per_example`, `validate`, `pretrained_weights`) hand
them over. The contract:
  build(section, text, width, dtype) -> Linen module   `width`: the context width the backbone reads
  module(feats, valids, prompts, t_emb_BD) -> (context [B, S, width], context validity [B, S][, pooled [B, P]])
      or a `Conditioning`: the pooled vector (SDXL's text_embeds) only where the conditioner gives one (identity,
      from towers with output="pooled"); a second context `code` [B, M, C] for a backbone with a second
      cross-attention (the Diff Adapter's text code; a U-Net reads it, a DiT does not); `outputs(...)` reads any form
      feats / valids / prompts: per text tower, features [B, L, D], validity and prompt (not instruction)
      masks; t_emb_BD: the denoiser's timestep embedding (refiners conditioned on time read it, others not)
  flops_per_example(section, text, text_shapes, width) -> forward FLOPs of one example   (plan, MFU)
  activation_bytes(section, text, text_shapes, width, tensor) -> bytes one example keeps for the backward pass
      (optional; plan)
  validate(section, text, geometry)   its own config checks (configs.validate calls it; geometry: the
      family's `denoisers.Geometry`, e.g. the context width it wants)
  pretrained_weights(section) -> {"conditioner/...": array}   optional: released weights a run starts from
      (LLM4GEN's projector, `conditioner.cam.init`)
  LORA_TARGETS: regexes over kernel names   optional: its kernels that `lora.targets=()` gives pairs (attention)
A new conditioner is one file here plus its name below.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.config_checks import ConfigError, plugin_section
from lidit_jax.models import layers

CONDITIONERS = {"refiners": "lidit_jax.conditioners.lidit", "tokens": "lidit_jax.conditioners.tokens",
                "identity": "lidit_jax.conditioners.identity", "llm4gen": "lidit_jax.conditioners.llm4gen",
                "diff_adapter": "lidit_jax.conditioners.diff_adapter"}
DEFAULT = "refiners"  # base_config's choice


class Conditioning(NamedTuple):
  context: jax.Array  # [B, S, width]
  valid: jax.Array  # [B, S]
  pooled: jax.Array | None = None  # [B, P]
  code: jax.Array | None = None  # [B, M, C]: a second context (the Diff Adapter's), for a second cross-attention
  code_valid: jax.Array | None = None  # [B, M]


def conditioner(config) -> ModuleType:
  name = config.conditioner.kind
  if name not in CONDITIONERS:
    raise ConfigError(f"config conditioner.kind={name!r} is not a conditioner. Fix: set "
                      f"--config.conditioner.kind to one of {sorted(CONDITIONERS)}")
  return importlib.import_module(CONDITIONERS[name])


def build(config, width: int) -> nn.Module:
  """The chosen conditioner for a backbone whose context is `width` wide (a family's build calls it)."""
  module = conditioner(config)
  return module.build(plugin_section(config, module), config.text, width, jnp.dtype(config.model.dtype))


def flops_per_example(config, text_shapes, width: int) -> int:
  module = conditioner(config)
  return module.flops_per_example(plugin_section(config, module), config.text, text_shapes, width)


def activation_bytes(config, batch: int, text_shapes, width: int, tensor: int) -> int:
  """What `batch` examples keep for the backward pass in the conditioner (0 where it declares nothing: small)."""
  module = conditioner(config)
  if not hasattr(module, "activation_bytes"):
    return 0
  return int(batch * module.activation_bytes(plugin_section(config, module), config.text, text_shapes, width, tensor))


def validate(config, geometry) -> None:
  module = conditioner(config)
  module.validate(plugin_section(config, module), config.text, geometry)


def pretrained_weights(config) -> dict:
  """Released weights the chosen conditioner starts from ({} for most)."""
  module = conditioner(config)
  return module.pretrained_weights(plugin_section(config, module)) if hasattr(module, "pretrained_weights") else {}


def context_valid(valids: Sequence[jax.Array], prompts: Sequence[jax.Array], drop_instruction: bool) -> jax.Array:
  """The concatenated context's validity: padding out, and the instruction's tokens too when asked (under jit
  shapes are static: the instruction is masked, never sliced away)."""
  keep = [v.astype(bool) & pm.astype(bool) if drop_instruction else v.astype(bool) for v, pm in zip(valids, prompts)]
  return jnp.concatenate(keep, axis=1)


def outputs(out) -> Conditioning:
  """A conditioner's call as a `Conditioning` (from a 2- or 3-tuple too)."""
  return out if isinstance(out, Conditioning) else Conditioning(*out)


def null_context(module, ctx_BSD, ctx_valid_BS, drop_B, kind: str = "learned", name: str = "null_context"):
  """Classifier-free guidance's unconditional context where `drop_B`: the learned `null_context` parameter of
  `module` (a family's root, so every family's checkpoints name it alike), all valid; or zeros (`kind="zeros"`,
  conditioner.null). With conditioner.null=empty_prompt the text was swapped before (drop_B is None). A second
  context (a conditioner's code) takes its own parameter, `name`."""
  if drop_B is None:
    return ctx_BSD, ctx_valid_BS
  if kind == "zeros":
    return jnp.where(drop_B[:, None, None], 0, ctx_BSD), ctx_valid_BS
  null = module.param(name, layers.logical(nn.initializers.normal(0.02), ("length", "embed")),
                      ctx_BSD.shape[1:], jnp.float32).astype(ctx_BSD.dtype)
  return (jnp.where(drop_B[:, None, None], null[None], ctx_BSD), jnp.where(drop_B[:, None], True, ctx_valid_BS))
