"""Train state, optimizer, and the sharded set-up shared by train / sample / evaluate.

Initialisation goes eval_shape -> shardings -> jit(init, out_shardings=...), so nothing is ever
materialised unsharded. The frozen parts (text towers, autoencoder) are separate, outside the optimizer
state: `Setup.frozen = {"towers": {name: params}, "autoencoder": params or None}`, one argument of every step.
With LoRA (`lora.rank` > 0) the train state's parameters are the factors (`lora.Adapter`) and the model's own
weights are frozen too, `Setup.frozen["base"]`; `Setup.model_params` merges them into the model's parameters.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath

from lidit_jax import conditioners
from lidit_jax import configs
from lidit_jax import denoisers
from lidit_jax import lora as lora_lib
from lidit_jax import sharding
from lidit_jax import text_cache
from lidit_jax import autoencoder as autoencoder_lib
from lidit_jax import checkpoint as ckpt_lib
from lidit_jax import model as model_lib
from lidit_jax.cli import NotFound
from lidit_jax.data import pipeline


def text_inputs(towers, tower_params, text):
  """Frozen-tower features and masks for the denoiser, from tokenized prompts (the towers run here) or
  from cached features (`text_cache`: the towers are not needed)."""
  feats = [text[t.name]["hidden"] if "hidden" in text[t.name] else
           t.encode(tower_params[t.name], text[t.name])
           for t in towers]
  # a pooled output is one valid vector (its masks are its tokens')
  mask = lambda t, key: (jnp.ones_like(text[t.name][key][:, :1], bool) if t.pooled
                         else text[t.name][key].astype(bool))
  valids = [mask(t, "attention_mask") for t in towers]
  prompts = [mask(t, "prompt_mask") for t in towers]
  return feats, valids, prompts


def with_null_text(text, null_text, drop_B):
  """`conditioner.null=empty_prompt`: the batch's text inputs with those of the dropped examples replaced by the
  empty prompt's (`null_text`: the same tree, batch 1), tokens or cached features alike."""
  return jax.tree.map(lambda a, n: jnp.where(drop_B.reshape(-1, *[1] * (a.ndim - 1)), jnp.asarray(n, a.dtype), a),
                      text, null_text)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def make_optimizer(config):
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.lr, o.warmup_steps, config.train.num_steps, end_value=o.lr * o.min_lr_ratio)
  # grad_clip=0 means no clipping (clip_by_global_norm(0) would zero every update and freeze the model).
  clip = optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity()
  tx = optax.chain(clip, optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                                   mask=decay_mask))
  if config.train.freeze:  # frozen groups: no update, no optimizer state
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               lambda params: jax.tree.map(lambda f: "frozen" if f else "train",
                                                           matching(params, config.train.freeze)))
  return tx, schedule


def matching(params, patterns):
  """A tree of bools: whether a parameter's name ("denoiser/blocks/...") matches one of the regexes."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(re.search(rx, ckpt_lib.param_name(p)) for rx in patterns), params)


def decay_mask(params):
  """Weight decay on kernels only, not on biases or norm scales (by name: scanned ones are 2-D too)."""
  def is_kernel(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(names) and names[-1] == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a run needs besides data: model, towers, autoencoder, mesh, shardings, initial values."""
  config: Any
  model: Any  # the denoiser family's module (denoisers: the contract)
  towers: list
  autoencoder: Any  # autoencoder.Pixels | VAE; None when planning a VAE run before the VAE exists
  frozen: dict  # {"towers": ..., "autoencoder": ...}: parameters no optimizer touches
  text_for: Any  # (captions, negative=False) -> per-tower text inputs: tokens, or features from text.cache
  mesh: Any
  rules: tuple  # logical axis -> mesh axes (sharding.rules of config.sharding_rules)
  tx: Any
  schedule: Any
  state_shardings: Any
  abstract_state: Any
  null_text: Any = None  # conditioner.null=empty_prompt: text_for([""], negative=True), the unconditional text inputs
  abstract_params: Any = None  # the model's parameters in shape, with their shardings (= abstract_state.params
                               # but with LoRA, whose state holds the factors)
  lora: lora_lib.Adapter | None = None
  axis_names: dict | None = None  # {parameter path: logical axis names} of the model (LoRA files pair by them)

  def init_state(self, rng) -> TrainState:
    """A fresh state; with `model.init` its weights (but those `model.init_skip` names) come from the EMA of
    another run's latest checkpoint (fine-tuning, or a backbone under new modules). With LoRA: fresh factors (the
    model's weights are `frozen["base"]`, made with the Setup)."""
    if self.lora is not None:
      make = lambda r: _state_of(self.lora.init(r, self.abstract_params, boxed=True), self.tx)
    else:
      make = lambda r: _state_of(_init_params(self.config, self.model, self.towers, r), self.tx)
    init = jax.jit(lambda r: nn.unbox(make(r)), out_shardings=self.state_shardings)
    with sharding.active(self.mesh, self.rules):
      state = init(rng)
    params = state.params if self.lora is not None else self._with_pretrained(state.params)
    if params is state.params:
      return state
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))  # two buffers: both donated

  def init_params(self, rng):
    """The model's initial parameters alone, as `init_state` gives them (no optimizer state or EMA): a model
    sampled as a run of its config would start (a pipeline folder, a config), LoRA's frozen base."""
    init = jax.jit(lambda r: nn.unbox(_init_params(self.config, self.model, self.towers, r)),
                   out_shardings=jax.tree.map(lambda a: a.sharding, self.abstract_params))
    with sharding.active(self.mesh, self.rules):
      return self._with_pretrained(init(rng))

  def model_params(self, params):
    """The model's parameters from a train state's (`params` or `ema_params`): themselves, or with LoRA the frozen
    base with the factors merged in."""
    if self.lora is None:
      return params
    with sharding.active(self.mesh, self.rules):
      return jax.jit(self.lora.merge)(self.frozen["base"], params)

  def _with_pretrained(self, params):
    """`params` with what `model.init` names and the conditioner's released weights (LLM4GEN's projector)."""
    loaded = pretrained_weights(self.config, self.abstract_params) if self.config.model.init else {}
    loaded.update(conditioners.pretrained_weights(self.config))
    if not loaded:
      return params
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(loaded[ckpt_lib.param_name(p)], x.sharding).astype(x.dtype)
        if ckpt_lib.param_name(p) in loaded else x, params)


def pretrained_weights(config, abstract_params) -> dict:
  """{name: array} that `model.init` names: the EMA weights of another run's workdir, else what the family reads
  (`pretrained_weights` in its file: the U-Net family's, a converted diffusers U-Net); `model.init_skip` names
  stay fresh."""
  m = config.model
  if not epath.Path(m.init).exists():
    raise NotFound(f"model.init={m.init!r} does not exist. Fix: point at a training workdir (or, for the U-Net "
                   "family, a converted diffusers U-Net)")
  loaded = None if epath.Path(ckpt_lib.checkpoint_dir(m.init)).is_dir() else denoisers.pretrained_weights(config, m.init)
  if loaded is not None:
    return {k: v for k, v in loaded.items() if not any(re.search(rx, k) for rx in m.init_skip)}
  return ckpt_lib.restore_weights(m.init, abstract_params, m.init_skip)


def _init_params(config, model, towers, rng):
  inputs = model_lib.abstract_inputs(config, 1, [(t.hidden_size, t.num_layers) for t in towers])
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), inputs)
  return model.init(rng, **zeros)["params"]


def _state_of(params, tx) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params))


def setup(config, use_text_cache: bool = True, abstract: bool = False, devices=None, training: bool = True) -> Setup:
  """`use_text_cache=False` loads the towers even when text.cache is set (sampling new prompts).
  `training=False`: for sampling, the training batch need not divide over the devices here.
  `abstract=True` builds everything from shapes only (no tokenizers, checkpoints or parameters; towers from
  their checkpoints' configs or the config's fields): for compiling and planning a run before it exists.
  `devices` (default `jax.devices()`) may be a TPU slice's compile-only devices, with `abstract=True`."""
  mesh, rules = sharding.make_mesh(config.mesh, devices), sharding.rules(config.sharding_rules)
  shards = mesh.shape["data"] * mesh.shape["fsdp"] * config.train.grad_accum
  if training and config.train.batch_size % shards:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by data x fsdp devices x "
                     f"train.grad_accum ({mesh.shape['data']} x {mesh.shape['fsdp']} x {config.train.grad_accum})."
                     " Fix: change the batch size, the mesh or grad_accum.")
  model = model_lib.build_model(config, mesh.devices.flat[0].platform)  # the kernels of the mesh's chips
  ae, ae_params = autoencoder_lib.build(config.autoencoder, abstract=abstract)  # a bad VAE fails before the LLMs
  if ae_params is not None:  # small and convolutional: replicated (its logical axes map to no mesh axis)
    repl = sharding.replicated(mesh)
    ae_params = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), ae_params)
                 if abstract else jax.device_put(jax.device_get(ae_params), repl))  # host values: every process
  towers = model_lib.abstract_towers(config) if abstract else model_lib.build_towers(config)
  tx, schedule = make_optimizer(config)
  with sharding.active(mesh, rules):
    boxed_params = jax.eval_shape(lambda r: _init_params(config, model, towers, r), jax.random.key(0))
  names = [ckpt_lib.param_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed_params))]
  for key, patterns in (("model.init_skip", config.model.init_skip), ("train.freeze", config.train.freeze)):
    unused = [rx for rx in patterns if not any(re.search(rx, n) for n in names)]
    if unused:  # a pattern naming no parameter is a typo: refuse it before any compute
      raise configs.ConfigError(f"config {key} pattern {unused[0]!r} matches no parameter. Fix: use a regex "
                                f"over parameter names such as {names[0]!r} or 'denoiser/'")
  axis_names = sharding.axis_names(boxed_params)
  adapter = lora_lib.Adapter.of(config.lora, axis_names, denoisers.lora_targets(config))
  in_shape = lambda boxed: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                        nn.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules))
  abstract_params = in_shape(boxed_params)
  trained = boxed_params
  if adapter is not None:
    trained = jax.eval_shape(lambda r: adapter.init(r, abstract_params, boxed=True), jax.random.key(0))
  with sharding.active(mesh, rules):
    boxed = jax.eval_shape(lambda p: _state_of(p, tx), trained)
  state_shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract_state = in_shape(boxed)
  text_for = None  # abstract: shapes only
  if abstract:
    tower_params = model_lib.abstract_tower_params(towers, mesh, rules)
  elif config.text.cache == "memory" and use_text_cache:  # the towers run once per caption, not once per step
    with sharding.active(mesh, rules):
      params = model_lib.load_tower_params(config, towers, mesh, rules)
    text_for, tower_params = text_cache.MemoryCache(towers, params), {}
  elif config.text.cache and use_text_cache:  # features come from disk; the LLMs are never loaded
    text_for, tower_params = text_cache.TextCache(config.text.cache, config, towers), {}
  else:
    text_for = functools.partial(pipeline.tokenize, towers)
    with sharding.active(mesh, rules):
      tower_params = model_lib.load_tower_params(config, towers, mesh, rules)
  null_text = text_for([""], negative=True) if config.conditioner.null == "empty_prompt" and not abstract else None
  s = Setup(config, model, towers, ae, {"towers": tower_params, "autoencoder": ae_params}, text_for, mesh, rules, tx,
            schedule, state_shardings, abstract_state, null_text, abstract_params, adapter, axis_names)
  if adapter is not None:  # the model's own weights, frozen: model.init's, else the seed's initialisation
    base = abstract_params if abstract else s.init_params(jax.random.key(config.seed))
    s.frozen["base"] = base
  return s


def restore_for_inference(config, workdir: str):
  """(Setup, the model's EMA params, step) from the latest checkpoint in workdir, or a clear error."""
  ckpt = ckpt_lib.require(workdir)  # fail before building anything
  s = setup(config, use_text_cache=False, training=False)  # new prompts need the towers
  state, _ = ckpt.restore(s.abstract_state)
  ckpt.close()
  return s, s.model_params(state.ema_params), int(state.step)
