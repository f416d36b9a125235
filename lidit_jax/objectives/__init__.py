"""Training objectives, chosen by `objective.kind`: the one place where an objective's name meets its file.

An objective owns its time convention, training targets, loss weighting and samplers; the trainer and the
sampler call it through this contract and nothing else:
  Each receives its own section (`CONFIG_DEFAULTS` names it: `flow`, `ddpm`) and the shared `sample` section.
  build(section, sample, geometry) -> objective   geometry: the family's (`denoisers.Geometry`: its image token count)
  objective.draw(rng_t, rng_noise, x0) -> {"t": [B], "eps": like x0}   a batch's times and noise, drawn once
      for the whole batch (so that micro-batching changes nothing but memory)
  objective.loss(net, x0, draws) -> loss [B]    net(x_t, t) -> the network's output
  objective.sample(net, noise, steps, sampler, rng=None) -> x0    net: the (guided) network; noise: unit
      Gaussian (scaled to the start time here); rng: for samplers that draw noise at every step
  objective.step_times(steps, sampler) -> [steps]   optional: the time the network sees at each step, descending
      (guidance on the first steps only, `sample.cfg_trunc`, needs it)
  with_scheduler(section, sample, scheduler, geometry) -> (objective, sampler)   optional: sampling with another scheduler than
      the config's (a sampler name; objectives that know diffusers' schedulers also take their config dicts)
  validate(section, sample)   its own section and sampler names (configs.validate calls it; ConfigError by name)
  SAMPLERS           the sampler names it takes (sample.sampler, `sample --sampler`)
Classifier-free guidance (`guidance.guided`) is shared by all. A denoiser whose output carries a learned variance
(geometry.variance: [prediction, variance] channels) is sampled on its prediction (`mean_only`); an objective
that can learn the variance (DDPM) trains it. A new objective is one file here plus its name.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import jax.numpy as jnp

from lidit_jax.config_checks import ConfigError, plugin_section


def mean_only(net, variance: bool):
  """`net` without the learned-variance half of its output channels (when `variance`)."""
  if not variance:
    return net
  return lambda x, t, *rest, **kw: jnp.split(net(x, t, *rest, **kw), 2, axis=-1)[0]


OBJECTIVES = {"rectified_flow": "lidit_jax.objectives.flow", "ddpm": "lidit_jax.objectives.ddpm"}
DEFAULT = "rectified_flow"  # base_config's choice


def objective(config) -> ModuleType:
  """The module of `objective.kind`."""
  kind = config.objective.kind
  if kind not in OBJECTIVES:
    raise ConfigError(f"config objective.kind={kind!r} is not an objective. Fix: set "
                      f"--config.objective.kind to one of {sorted(OBJECTIVES)}")
  return importlib.import_module(OBJECTIVES[kind])


def validate(config) -> None:
  module = objective(config)
  module.validate(plugin_section(config, module), config.sample)


def build(config, geometry):
  module = objective(config)
  return module.build(plugin_section(config, module), config.sample, geometry)


def with_scheduler(config, scheduler, geometry):
  """(objective, sampler name) that sample with `scheduler` (None: the config's sample.sampler)."""
  module = objective(config)
  if hasattr(module, "with_scheduler"):
    return module.with_scheduler(plugin_section(config, module), config.sample, scheduler, geometry)
  sampler = scheduler or config.sample.sampler
  if not isinstance(sampler, str) or sampler not in module.SAMPLERS:
    raise ValueError(f"scheduler={sampler!r} is not a sampler of objective.kind={config.objective.kind!r}. "
                     f"Fix: use one of {module.SAMPLERS}")
  return module.build(plugin_section(config, module), config.sample, geometry), sampler
