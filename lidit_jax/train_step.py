"""The pure train step of any family (`make_train_step`) and its lowering on abstract inputs
(`lower_train_step`: compiling a config for a mesh, or for a TPU slice without one, `tpu_compile`). Apart from
the trainer (train.py: the loop, checkpoints, logging), so that the planner's compile path imports no trainer."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax

from lidit_jax import autoencoder as autoencoder_lib
from lidit_jax import denoisers, objectives, sharding
from lidit_jax import model as model_lib
from lidit_jax import state as state_lib


def ema_decay(config, step):
  """EMA with a warm-up: early on the average follows the weights, later it uses optim.ema_decay."""
  step = step.astype(jnp.float32)
  return jnp.minimum(config.optim.ema_decay, (1.0 + step) / (10.0 + step))


def clean_latents(autoencoder, params, image, rng):
  """A batch's "image" -> the denoiser's x0: uint8 pixels are encoded (a posterior sample, as diffusers'
  trainers draw), stored latents are sampled from their stored posterior (`autoencoder.from_stored`)."""
  if autoencoder is None:  # planning a VAE run before the VAE exists: the batch holds x0 itself
    return image.astype(jnp.float32)
  if image.dtype == jnp.uint8:  # pixels travel as bytes: scaled on device
    return autoencoder.encode(params, autoencoder_lib.from_uint8(image), rng).astype(jnp.float32)
  return autoencoder.from_stored(image.astype(jnp.float32), rng)  # stored latents are float16


def batch_draws(s: state_lib.Setup, objective, frozen, batch, rng, caption_dropout: float) -> dict:
  """A batch's denoiser inputs, drawn from `rng` for the whole batch (so micro-batching changes nothing but memory):
  clean latents, caption dropout, a seed per example for the model's own noise, the objective's times and noise."""
  r_drop, r_t, r_eps = jax.random.split(rng, 3)
  x0 = clean_latents(s.autoencoder, frozen["autoencoder"], batch["image"], jax.random.fold_in(rng, 3))
  b = x0.shape[0]
  return {"image": x0, "text": batch["text"], "drop": jax.random.bernoulli(r_drop, caption_dropout, (b,)),
          # the Diff Adapter's noise (rng stream "noise"), one seed per micro-batch
          "noise_seed": jax.random.randint(jax.random.fold_in(rng, 4), (b,), 0, 2 ** 31 - 1),
          **objective.draw(r_t, r_eps, x0)}


def batch_loss(s: state_lib.Setup, objective, held=None):
  """loss(params, frozen, mb, rng, train): the objective's mean loss over `batch_draws` (or a micro-batch of them).
  `held`: the frozen groups (train.freeze), behind stop_gradient: XLA computes no gradient for them, and the logged
  gradient norm is that of what trains. `train=False` drops no LoRA input features."""

  def loss_fn(params, frozen, mb, rng, train: bool = True):
    if held is not None:
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, held)
    text, drop = mb["text"], mb["drop"]
    if s.null_text is not None:  # conditioner.null=empty_prompt: dropped captions become ""
      text, drop = state_lib.with_null_text(text, s.null_text, drop), None
    feats, valids, prompts = state_lib.text_inputs(s.towers, frozen["towers"], text)
    rngs = {"noise": jax.random.fold_in(jax.random.fold_in(rng, 4), mb["noise_seed"][0])}
    if s.lora is not None:  # the factors train; the model applies the frozen base with them merged in
      r_lora = jax.random.fold_in(jax.random.fold_in(rng, 5), mb["noise_seed"][0]) if train else None
      params = s.lora.merge(frozen["base"], params, r_lora)
    net = lambda x, t: s.model.apply({"params": params}, x, t, feats, valids, prompts, drop, rngs=rngs)
    return jnp.mean(objective.loss(net, mb["image"], mb))
  return loss_fn


def make_train_step(s: state_lib.Setup):
  config = s.config
  objective = objectives.build(config, denoisers.geometry(config))
  held = state_lib.matching(s.abstract_state.params, config.train.freeze) if config.train.freeze else None
  loss_of = batch_loss(s, objective, held)

  def train_step(state: state_lib.TrainState, frozen, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    full = batch_draws(s, objective, frozen, batch, rng, config.data.caption_dropout)
    b = full["image"].shape[0]
    loss_fn = lambda params, mb: loss_of(params, frozen, mb, rng)

    k = config.train.grad_accum
    if k == 1:
      loss, grads = jax.value_and_grad(loss_fn)(state.params, full)
    else:
      # Micro-batch i takes examples i, i + k, ...: every device keeps contributing to each micro-batch.
      micro = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(b // k, k, *a.shape[1:]), 0, 1), full)

      def accumulate(carry, mb):
        l, g = jax.value_and_grad(loss_fn)(state.params, mb)
        return (carry[0] + l, jax.tree.map(jnp.add, carry[1], g)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
      loss, grads = loss / k, jax.tree.map(lambda g: g / k, grads)
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay(config, state.step)
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
               "lr": s.schedule(state.step)}
    return state_lib.TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics

  repl = sharding.replicated(s.mesh)
  batch_sh = sharding.batch_sharding(s.mesh)
  frozen_sh = jax.tree.map(lambda x: x.sharding, s.frozen)  # as loaded (towers sharded by logical axes)
  jitted = jax.jit(train_step, in_shardings=(s.state_shardings, frozen_sh, batch_sh, repl),
                   out_shardings=(s.state_shardings, repl), donate_argnums=(0,))

  def run(state, frozen, batch, rng):
    with sharding.active(s.mesh, s.rules):
      return jitted(state, frozen, batch, rng)
  run.jitted = jitted  # for lowering / cost analysis in benchmarks
  return run


def make_eval_step(s: state_lib.Setup):
  """eval_step(params, frozen, batch, rng) -> the mean loss of `params` (a train state's, e.g. its EMA) on a held-out
  batch, with everything drawn from `rng` and no caption or LoRA dropout: a fixed key gives the same numbers at
  every evaluation, after a resume and on any number of devices (threefry draws do not depend on the sharding)."""
  objective = objectives.build(s.config, denoisers.geometry(s.config))
  loss_of = batch_loss(s, objective)

  def eval_step(params, frozen, batch, rng):
    return loss_of(params, frozen, batch_draws(s, objective, frozen, batch, rng, 0.0), rng, train=False)

  frozen_sh = jax.tree.map(lambda x: x.sharding, s.frozen)
  jitted = jax.jit(eval_step, in_shardings=(s.state_shardings.ema_params, frozen_sh, sharding.batch_sharding(s.mesh),
                                            sharding.replicated(s.mesh)), out_shardings=sharding.replicated(s.mesh))

  def run(params, frozen, batch, rng):
    with sharding.active(s.mesh, s.rules):
      return jitted(params, frozen, batch, rng)
  return run


def abstract_text(s, b: int, where) -> dict:
  """A batch of `b` prompts' text inputs in shape (placed by `where`): token ids, or cached features with
  text.cache."""
  config, text = s.config, {}
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=where)
  for t in s.towers:
    n = config.text.towers[t.name].max_length
    text[t.name] = {k: sds((b, n), jnp.int32) for k in ("attention_mask", "prompt_mask")}
    if config.text.cache:
      text[t.name]["hidden"] = sds((b, 1 if t.pooled else n, t.hidden_size), t.dtype)
    else:  # a token selection runs the tower over more tokens (known from the tokenizer; without one, n)
      tokens = t.encoder.token_length if t.encoder is not None else n
      text[t.name]["input_ids"] = sds((b, tokens), jnp.int32)
      if config.text.towers[t.name].selection != "all":
        text[t.name].update(token_mask=sds((b, tokens), jnp.int32), select=sds((b, n), jnp.int32))
  return text


def lower_train_step(config, devices=None):
  """The train step lowered on abstract inputs (nothing allocated): `.compile()` it to check a config on a
  mesh, `.cost_analysis()` for FLOPs. Text inputs are token ids, or cached features with text.cache; images
  are uint8 pixels (encoded in the step), or stored latents with data.source=features or before the VAE exists.
  `devices`: those of the mesh (default `jax.devices()`), e.g. a TPU slice's from `jax.experimental.topologies`."""
  s = state_lib.setup(config, abstract=True, devices=devices)
  b, sh = config.train.batch_size, sharding.batch_sharding(s.mesh)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  text = abstract_text(s, b, sh)
  if s.autoencoder is None or config.data.source == "features":
    h, w, c = model_lib.latent_shape(config)
    image = sds((b, h, w, s.autoencoder.stored_channels if s.autoencoder else c), jnp.float16)
  else:
    image = sds((b, config.data.image_size, config.data.image_size, 3), jnp.uint8)
  if config.conditioner.null == "empty_prompt":  # the empty prompt's text inputs, in shape
    s = dataclasses.replace(s, null_text=jax.tree.map(lambda a: np.zeros((1, *a.shape[1:]), a.dtype), text))
  step = make_train_step(s)
  # the key abstract too: a concrete one lives on this host's CPU, which a compile-only GPU mesh refuses
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(s.mesh, P()))
  with sharding.active(s.mesh, s.rules):
    return step.jitted.lower(s.abstract_state, s.frozen, {"image": image, "text": text}, key)
