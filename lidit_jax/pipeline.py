"""The Python entry: a model in, images out.

  from lidit_jax.pipeline import Pipeline
  pipe = Pipeline.from_pretrained("stable-diffusion-v1-5")      # a diffusers pipeline folder (SD 1.x / 2.x / XL, PixArt)
  pipe = Pipeline.from_pretrained("./runs/shapes")              # a training workdir of any family
  images = pipe(["a red circle"], num_steps=25, guidance=7.5, seed=0)   # numpy float32 [B, H, W, 3] in [0, 1]

`latents` is the initial noise NHWC as diffusers' pipelines take it (before the scheduler's init_noise_sigma),
so the same noise gives the same images in both. Without it, image i of a call draws its noise from
(seed, i). Prompts run in batches of `batch_size` (the last one padded: one compiled shape), jitted once per
(shape, steps, guidance, scheduler) and sharded over every device along the batch.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from lidit_jax import configs, denoisers, lora, objectives, resolution_bins, sharding, train_step, state as state_lib
from lidit_jax.cli import NotFound
from lidit_jax.objectives import guidance as guidance_lib


def _as_list(prompts, n: int | None = None, what: str = "prompts") -> list[str]:
  out = [prompts] if isinstance(prompts, str) else list(prompts)
  if n is not None and len(out) == 1 and n > 1:
    out = out * n
  if n is not None and len(out) != n:
    raise ValueError(f"{what}: {len(out)} given for {n} prompts. Fix: give one, or one per prompt")
  return out


def _at_least_1(name: str, value, what: str) -> int:
  """The Python API validates as the command line does: a ValueError naming the argument and the fix."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r}: must be a whole number of at least 1. Fix: pass {what}")
  return int(value)


class Pipeline:
  """Prompts -> images for one model (`backend`: a `Workdir`, the model's text side, denoiser and decoder)."""

  def __init__(self, backend):
    self.backend = backend
    self._compiled: dict = {}

  def with_weights(self, params, step: int | None = None) -> "Pipeline":
    """The same model with other weights (the trainer's EMA at a sampling step): the compiled samplers, which take
    the weights as an argument, are shared."""
    b = self.backend
    pipe = Pipeline(dataclasses.replace(b, params={**b.params, "model": params}, step=b.step if step is None else step))
    pipe._compiled = self._compiled
    return pipe

  def load_lora(self, path, scale: float = 1.0) -> "Pipeline":
    """Merge a LoRA file (diffusers' / peft's, kohya's or LyCORIS' layout, `lora.read`: what `export lora` and the
    PyTorch tools write for this model, text encoder parts included) into the weights, times `scale`; several stack
    (each merged in turn: their deltas add). Merged once rather than applied at every step: sampling then costs
    what it did, and the compiled samplers (the weights are their argument) are reused. Returns the pipeline
    (changed in place)."""
    path = os.fspath(path)
    try:
      scale = float(scale)
    except (TypeError, ValueError):
      scale = float("nan")
    if not np.isfinite(scale):
      raise ValueError(f"scale={scale!r}: must be a finite number. Fix: pass e.g. 1.0 (0.5: half the LoRA)")
    if not os.path.isfile(path):
      raise ValueError(f"path={path!r}: no such file. Fix: pass a LoRA .safetensors file")
    try:
      with safe_open(path, framework="numpy") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    except Exception as e:  # a damaged or foreign file: one clear error
      raise ValueError(f"path={path!r}: not a readable safetensors file ({e}). Fix: pass a LoRA .safetensors file")
    b, s = self.backend, self.backend.setup
    kernels = {p: n for p, n in s.axis_names.items() if p[-1] == "kernel" and len(n) >= 2}
    shapes = lora.shapes_of(b.params["model"])
    where = lora.model_slots(kernels, shapes, denoisers.lora_names(s.config))
    towers, plans, seen = dict(b.params["frozen"]["towers"]), {}, []
    prefixes = denoisers.lora_tower_prefixes(s.config)
    for t in s.towers:  # the text encoders' parts of a file (a tower's parameters shared by two readings: once)
      if t.name not in towers or any(towers[t.name] is x for x in seen) or not hasattr(t.kind, "plan"):
        continue
      seen.append(towers[t.name])
      plans[t.name] = t.kind.plan(t.module.cfg)
      slots = lora.tower_slots(t.name, plans[t.name], lora.shapes_of(towers[t.name]), prefixes.get(t.name, [t.name]))
      for module, found in slots.items():
        where.setdefault(module, []).extend(found)  # SDXL's second encoder: its states' tower and its pooled one
    pairs = lora.read(tensors, metadata, where, scale)
    factors, paired = lora.as_factors({k: v for k, v in pairs.items() if not isinstance(k[0], str)}, kernels, shapes)
    with sharding.active(s.mesh, s.rules):
      params = jax.jit(lambda p, f: lora.merge(p, f, paired, 0.0))(b.params["model"], factors)
    for name, plan in plans.items():
      mine = {k: v for k, v in pairs.items() if k[0] == name}
      if mine:
        merged = lora.merge_tower(towers[name], mine, plan)
        towers.update({n: merged for n, v in towers.items() if v is towers[name]})  # its other readings too
    self.backend = dataclasses.replace(b, params={**b.params, "model": params,
                                                  "frozen": {**b.params["frozen"], "towers": towers}})
    return self

  @classmethod
  def from_pretrained(cls, path, dtype=jnp.float32) -> "Pipeline":
    """A diffusers pipeline folder (model_index.json; its components diffusers' or converted by `python -m
    lidit_jax.convert diffusers`), a training workdir (config.json + checkpoints/), or a config (a ConfigDict, or
    a file `configs/x.py[:arg]`) whose model is sampled as a run of it starts: the weights `model.init` and the
    conditioner's released weights give it (configs/llm4gen_sd15.py), nothing trained.
    `dtype=None`: a pipeline folder in float32, a workdir or config in its model.dtype."""
    if isinstance(path, ml_collections.ConfigDict) or str(path).partition(":")[0].endswith(".py"):
      config = configs.validate(path if isinstance(path, ml_collections.ConfigDict) else
                                configs.load_config_file(path), data=False)  # sampling reads no training data
      return cls(Workdir.from_config(config, dtype))
    path = os.path.expanduser(os.fspath(path))
    if os.path.isfile(os.path.join(path, "model_index.json")):
      config = denoisers.pipeline_config(configs.base_config(), path)
      if config is None:
        raise NotFound(f"{path}/model_index.json: no model family here reads this pipeline "
                       "(Stable Diffusion 1.x / 2.x / XL and PixArt-alpha / Sigma folders are read). Fix: point at one "
                       "of those")
      dtype = jnp.dtype(dtype or jnp.float32).name  # a pipeline folder: every part in one dtype, float32 by default
      for tower in config.text.towers.values():
        tower.dtype = dtype
      config.autoencoder.dtype = dtype
      return cls(Workdir.from_config(configs.validate(config, data=False), dtype))
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
      return cls(Workdir.load(path, dtype))
    raise NotFound(f"{path!r} is neither a diffusers pipeline folder (model_index.json) nor a training workdir "
                   "(config.json + checkpoints/). Fix: point at one of them")

  @property
  def defaults(self) -> dict:
    return self.backend.defaults

  def __call__(self, prompts: str | Sequence[str], num_steps: int | None = None, guidance: float | None = None,
               negative_prompt: str | Sequence[str] | None = None, seed: int = 0, latents=None,
               height: int | None = None, width: int | None = None, scheduler: str | dict | None = None,
               batch_size: int = 8, progress: bool = False, cfg_trunc: float | None = None,
               resolution_binning: bool = True) -> np.ndarray:
    """Images [len(prompts), height, width, 3] in [0, 1]. `cfg_trunc`: guidance on that fraction of the first steps
    only (Lumina2Pipeline's cfg_trunc_ratio; None: the model's sample.cfg_trunc). `resolution_binning`: a model
    with bins (sample.resolution_bins: PixArt's, Sana's) draws the size's aspect-ratio bin and resizes the image
    to the size asked (diffusers' use_resolution_binning); False draws the size asked."""
    prompts = _as_list(prompts)
    if not prompts:
      raise ValueError("prompts: none given. Fix: pass a prompt or a list of prompts")
    b = self.backend
    negatives = None if negative_prompt is None else _as_list(negative_prompt, len(prompts), "negative_prompt")
    steps = _at_least_1("num_steps", b.defaults["num_steps"] if num_steps is None else num_steps,
                        "a number of sampling steps (None: the model's default)")
    try:
      scale = float(b.defaults["guidance"] if guidance is None else guidance)
    except (TypeError, ValueError):
      scale = float("nan")
    if not np.isfinite(scale):  # NaN would fail every `scale > 1` test and sample unguided, silently
      raise ValueError(f"guidance={guidance!r}: must be a finite number. Fix: pass e.g. 5.0 (1.0: no guidance; "
                       "None: the model's default)")
    height = _at_least_1("height", b.defaults["height"] if height is None else height, "a size in pixels (None: "
                         f"the model's {b.defaults['height']})")
    width = _at_least_1("width", b.defaults["width"] if width is None else width, "a size in pixels (None: "
                        f"the model's {b.defaults['width']})")
    batch_size = _at_least_1("batch_size", batch_size, "a number of prompts per compiled batch, e.g. 8")
    cfg_trunc = b.setup.config.sample.cfg_trunc if cfg_trunc is None else cfg_trunc
    if not (isinstance(cfg_trunc, (int, float)) and 0.0 <= cfg_trunc <= 1.0):
      raise ValueError(f"cfg_trunc={cfg_trunc!r}: must be the fraction of the first steps that are guided, in [0, 1]. "
                       "Fix: pass e.g. 0.25 (1.0: every step; None: the model's default)")
    objective, sampler = b.scheduler(scheduler)
    above = None
    if scale > 1.0 and cfg_trunc < 1.0:
      if not hasattr(objective, "step_times"):
        raise ValueError(f"cfg_trunc={cfg_trunc}: this model's objective guides every step. Fix: leave it None")
      above = guidance_lib.truncation_time(objective.step_times(steps, sampler), cfg_trunc)
    drawn = self._drawn(height, width, resolution_binning)
    shape = b.latent_shape(*drawn)
    if latents is not None:
      latents = np.asarray(latents, np.float32)
      if latents.shape != (len(prompts), *shape):
        binned = f", the bin of {height} x {width}" if drawn != (height, width) else ""
        raise ValueError(f"latents: shape {latents.shape}, expected {(len(prompts), *shape)} (NHWC, one per "
                         f"prompt, {drawn[0]} x {drawn[1]} px{binned}). Fix: draw them in that shape")
    # the scheduler argument determines the objective (the backend's mapping is fixed)
    key = (min(len(prompts), batch_size), shape, (height, width), steps, scale, above, sampler,
           json.dumps(scheduler, sort_keys=True))
    if key not in self._compiled:
      self._compiled[key] = self._compile(objective, sampler, steps, scale, above,
                                          (height, width) if drawn != (height, width) else None)
    run, n = self._compiled[key], key[0]
    out, starts = [], range(0, len(prompts), n)
    if progress:
      starts = tqdm(starts, desc=f"images (batches of {n})")
    for start in starts:
      idx = list(range(start, min(start + n, len(prompts))))
      pad = idx + [idx[-1]] * (n - len(idx))  # keep one compiled shape
      noise = latents[pad] if latents is not None else self.noise(
          [jax.random.fold_in(jax.random.key(seed), i) for i in pad], *drawn, resolution_binning=False)
      text = b.text([prompts[i] for i in pad], None if negatives is None else [negatives[i] for i in pad],
                    scale > 1.0, drawn)
      rng = jax.random.fold_in(jax.random.key(seed), 1_000_003 + start)  # ancestral samplers' fresh noise
      with sharding.active(b.mesh, b.setup.rules):
        images = run(b.params, *self._place(text, noise), rng)
      out.append(np.asarray(images, np.float32)[:len(idx)])
    return np.concatenate(out)

  def noise(self, keys, height: int | None = None, width: int | None = None,
            resolution_binning: bool = True) -> np.ndarray:
    """Initial noise [len(keys), h, w, c] (float32, NHWC), one image per jax key: what `latents` takes (at the
    size's resolution bin when the model bins sizes and `resolution_binning`)."""
    height = self.defaults["height"] if height is None else _at_least_1("height", height, "a size in pixels")
    width = self.defaults["width"] if width is None else _at_least_1("width", width, "a size in pixels")
    shape = self.backend.latent_shape(*self._drawn(height, width, resolution_binning))
    return np.stack([np.asarray(jax.random.normal(k, shape), np.float32) for k in keys])

  def _drawn(self, height: int, width: int, binning: bool) -> tuple[int, int]:
    """The size sampled for height x width: its resolution bin when the model has bins and `binning`."""
    bins = self.backend.setup.config.sample.resolution_bins if binning else 0
    return resolution_bins.nearest(height, width, bins) if bins else (height, width)

  def _place(self, text, noise):
    """Host inputs as global arrays (the same on every process), split along the batch over the data-parallel
    devices when it divides, else replicated."""
    mesh = self.backend.mesh
    split = sharding.batch_sharding(mesh)
    where = split if noise.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else sharding.replicated(mesh)
    put = lambda x: jax.make_array_from_process_local_data(where, np.asarray(x))
    return jax.tree.map(put, text), put(noise)

  def _compile(self, objective, sampler: str, steps: int, scale: float, above: float | None = None,
               size: tuple[int, int] | None = None):
    """`above`: guidance only at times above it (`guidance.truncation_time`); `size`: the images resized to cover it
    and centre-cropped (drawn at a resolution bin), before the [-1, 1] clip as diffusers' pipelines do."""
    b = self.backend

    def generate(params, text, noise, rng):
      predict = b.predictor(params, text, noise.shape[0], scale > 1.0, jax.random.fold_in(rng, 17))
      renorm = b.setup.config.sample.cfg_renorm
      net = guidance_lib.guided(predict, scale, renorm, above) if scale > 1.0 else (lambda x, t: predict(x, t)[0])
      images = b.decode(params, objective.sample(net, noise, steps, sampler, rng)).astype(jnp.float32)
      if size is not None:
        images = resolution_bins.resize_and_crop(images, *size)
      return jnp.clip(images / 2 + 0.5, 0.0, 1.0)
    # images come back whole on every process (several processes cannot read a sharded result)
    return jax.jit(generate, out_shardings=sharding.replicated(b.mesh))


def lower_sample(config, batch: int, devices=None):
  """`Pipeline`'s jitted sampling function for `batch` prompts at the config's sample settings (steps, sampler,
  guidance), lowered on abstract weights and inputs (nothing allocated): `.compile()` it to check that sampling
  fits a mesh, as `train_step.lower_train_step` does for training. `devices` as there (a TPU slice's)."""
  s = state_lib.setup(config, abstract=True, devices=devices)
  mesh = s.mesh
  where = (sharding.batch_sharding(mesh) if batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else
           sharding.replicated(mesh))  # as Pipeline._place splits a batch
  text = {"cond": train_step.abstract_text(s, batch, where)}
  guided = config.sample.cfg > 1.0
  if guided and config.conditioner.null == "empty_prompt":
    text["uncond"] = text["cond"]
    s = dataclasses.replace(s, null_text={})  # in shape only: the empty prompt's text is an input here
  backend = Workdir.of(s, s.abstract_params)
  objective, sampler = backend.scheduler(None)
  fn = Pipeline(backend)._compile(objective, sampler, config.sample.steps, float(config.sample.cfg))
  noise = jax.ShapeDtypeStruct((batch, *backend.latent_shape(config.data.image_size, config.data.image_size)),
                               jnp.float32, sharding=where)
  with sharding.active(mesh, s.rules):
    return fn.lower(backend.params, text, noise, jax.random.key(0))


def _twice(x):
  return jnp.concatenate([x, x])


# ---- the one backend: a model of any family (a workdir, a config, a pipeline folder made a config) ----

@dataclasses.dataclass
class Workdir:
  """A model's weights (a workdir's latest checkpoint's EMA, or the initial weights of a config or of a pipeline
  folder made one: `from_config`), through its family's contract (`state.text_inputs`):
  guidance mixes the conditional prediction with that of the null context (conditioner.null: learned, zeros, or the
  empty prompt's text) or of a negative prompt (zeros and empty_prompt models, as diffusers' pipelines do)."""
  setup: Any
  params: dict
  step: int
  defaults: dict

  @property
  def mesh(self):
    return self.setup.mesh

  @classmethod
  def load(cls, path: str, dtype, config=None) -> "Workdir":
    if config is None:
      config = configs.read_saved(path)
    if dtype is not None:  # on a copy: the caller's config is not changed
      config = config.copy_and_resolve_references()
      config.model.dtype = jnp.dtype(dtype).name
    return cls.of(*state_lib.restore_for_inference(config, path))

  @classmethod
  def from_config(cls, config, dtype=None) -> "Workdir":
    """The model a run of `config` starts from (its initial weights: `model.init`, the conditioner's released
    ones, the rest freshly initialised), with no checkpoint."""
    config = config.copy_and_resolve_references()
    if dtype is not None:
      config.model.dtype = jnp.dtype(dtype).name
    s = state_lib.setup(config, use_text_cache=False, training=False)
    params = s.frozen.get("base")  # a LoRA config's frozen base is the model its run starts from
    return cls.of(s, s.init_params(jax.random.key(config.seed)) if params is None else params)

  @classmethod
  def of(cls, setup, params=None, step: int = 0) -> "Workdir":
    """In memory: a `state.Setup` and its model's parameters (EMA weights; the trainer samples new ones through
    `Pipeline.with_weights`, which compiles nothing again)."""
    c = setup.config
    size = c.data.image_size
    frozen = {k: v for k, v in setup.frozen.items() if k != "base"}  # LoRA's base: merged into `params` already
    return cls(setup, {"model": params, "frozen": frozen}, step,
               dict(num_steps=c.sample.steps, guidance=c.sample.cfg, height=size, width=size, sampler=c.sample.sampler))

  def scheduler(self, scheduler):
    """(objective, sampler): the config's, another sampler name, or (DDPM) a diffusers scheduler config dict."""
    config = self.setup.config
    return objectives.with_scheduler(config, scheduler, denoisers.geometry(config))

  def latent_shape(self, height: int, width: int):
    return denoisers.sample_latent_shape(self.setup.config, height, width)

  def text(self, prompts, negatives, guided: bool, size):
    s = self.setup
    null = s.config.conditioner.null
    if negatives is not None and null == "learned":
      raise ValueError("negative_prompt: this model guides with its learned null context, not a negative prompt. "
                       "Fix: leave it None")
    text = {"cond": s.text_for(prompts)}
    if guided and negatives is not None:
      text["uncond"] = s.text_for(negatives, negative=True)
    elif guided and null == "empty_prompt":
      text["uncond"] = jax.tree.map(lambda a: np.repeat(a, len(prompts), axis=0), s.null_text)
    return text

  def predictor(self, params, text, b: int, guided: bool, rng=None):
    """The unconditional half reads the text of "" or a negative prompt ("uncond" in `text`), else the model's
    null context (conditioner.null: learned or zeros) by its drop flags. `rng`: the model's "sample_noise"
    stream (one draw per image, the same at every step: the Diff Adapter's code with noise="always")."""
    s = self.setup
    inputs = lambda t: state_lib.text_inputs(s.towers, params["frozen"]["towers"], t)
    apply = functools.partial(s.model.apply, {"params": params["model"]},
                              rngs=None if rng is None else {"sample_noise": rng})
    swapped = "uncond" in text
    # an empty_prompt model has no null context (no drop input); the others take flags
    flags = lambda *fs: None if s.config.conditioner.null == "empty_prompt" else jnp.concatenate(
        [jnp.full((b,), f and not swapped) for f in fs])
    feats, valids, prompts = inputs(text["cond"])
    if not guided:
      return lambda x, t: (apply(x, t, feats, valids, prompts, flags(False)), None)
    uncond = inputs(text["uncond"]) if swapped else (feats, valids, prompts)
    feats, valids, prompts = ([jnp.concatenate([x, y]) for x, y in zip(xs, ys)]
                              for xs, ys in zip((feats, valids, prompts), uncond))

    def predict(x, t):
      p = apply(_twice(x), _twice(t), feats, valids, prompts, flags(False, True))
      return p[:b], p[b:]
    return predict

  def decode(self, params, latents):
    return self.setup.autoencoder.decode(params["frozen"]["autoencoder"], latents)
