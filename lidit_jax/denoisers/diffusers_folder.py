"""What the families reading diffusers pipeline folders share (no family of its own): model_index.json, the
unconditional context a pipeline guides with, its VAE and scheduler as config values, its source folder behind a
run, and the parts of an exported folder that are copied rather than converted (scheduler, tokenizers, index)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from lidit_jax import autoencoder, config_checks, prompt, resolution_bins, torch_view
from lidit_jax.cli import UserError
from lidit_jax.convert import hf_text, registry
from lidit_jax.objectives import ddpm, flow


def index(path: str) -> dict:
  """A pipeline folder's model_index.json ({} where there is none)."""
  file = os.path.join(path, "model_index.json")
  if not os.path.isfile(file):
    return {}
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def holds(path: str, component: str, class_name: str) -> bool:
  """Whether `path` is a pipeline folder (diffusers' or converted) whose `component` is a `class_name`."""
  return (index(path).get(component) or [None, None])[1] == class_name


def null(idx: dict) -> str:
  """The unconditional context the pipeline guides with: zeros (force_zeros_for_empty_prompt) or the empty prompt."""
  return "zeros" if idx.get("force_zeros_for_empty_prompt") else "empty_prompt"


def denoiser_weights(path: str, what: str, section: str, have, want, params, ignore=()) -> dict:
  """{"denoiser/...": array} of a converted denoiser (`params`, its config `have`) for `model.init`, refused
  (UserError by field) where its layout is not the config's (`want`, from the `section` section; `ignore`: fields
  the weights do not fix)."""
  diff = {k: (v, getattr(want, k)) for k, v in dataclasses.asdict(have).items()
          if k not in ignore and v != getattr(want, k)}
  if diff:
    name, (theirs, ours) = next(iter(diff.items()))
    raise UserError(f"model.init={path!r}: its {what} has {name}={theirs!r}, the config {ours!r} ({len(diff)} fields "
                    f"differ: {sorted(diff)}). Fix: set the config's {section} section (and autoencoder.channels) to "
                    "the checkpoint's config.json")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"denoiser/" + "/".join(k.key for k in p): v for p, v in flat}


def read_autoencoder(c, path: str, kind: str = "vae"):
  """Point `c` at the folder's vae/ (autoencoder.kind `kind`, its path, factor and channels); returns its config."""
  conversion, class_name, _ = autoencoder.KINDS[kind]
  cfg = registry.component_config(conversion.__name__.rpartition(".")[2], path, "vae", class_name)
  c.autoencoder.update(kind=kind, path=path, factor=cfg.downsample_factor, channels=cfg.latent_channels)
  return cfg


def bin_base(size: int, bases: tuple[int, ...]) -> int:
  """sample.resolution_bins of a pipeline that picks its bins by image size (PixArt, Sana: the transformer's
  sample_size times a factor), one of its `bases`; 0 (no binning) where it has no table for the size."""
  assert set(bases) <= set(resolution_bins.SIZES)
  return size if size in bases else 0


def _scheduler_config(path: str) -> dict:
  with open(os.path.join(path, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
    return json.load(f)


def read_vae_and_scheduler(c, path: str):
  """Point `c` at the folder's VAE (`read_autoencoder`: returned, the VAE's config) and DDPM scheduler (the `ddpm`
  section and sampler; `ddpm.scheduler_keys` the keys it set, so that another sampler takes its own class's
  defaults for the rest, as diffusers' `OtherScheduler.from_config` does), and its unconditional context
  (conditioner.null)."""
  vae = read_autoencoder(c, path)
  values, sampler = ddpm.from_scheduler_config(_scheduler_config(path))
  c.ddpm, c.sample.sampler = ddpm.scheduler_section(values, sampler, c.ddpm), sampler
  c.ddpm.scheduler_keys = tuple(sorted(values))
  c.conditioner.null = null(index(path))
  return vae


def read_flow_scheduler(c, path: str) -> dict:
  """Point `c` at the folder's flow-matching scheduler (rectified flow, its sampler and shift: the training
  shift too) and unconditional context; returns {sampler, shift, num_train_timesteps}."""
  values = flow.from_scheduler_config(_scheduler_config(path), os.path.join(path, "scheduler"))
  c.objective.kind = "rectified_flow"
  c.sample.update(sampler=values["sampler"], shift=values["shift"])
  c.flow.update(shift=values["shift"], num_train_timesteps=values["num_train_timesteps"])
  c.conditioner.null = null(index(path))
  return values


def source_pipeline(config, where: str, is_folder) -> str:
  """The pipeline folder a model started from (`is_folder(path)` says which are): its model.init (the folder, a
  component of it, or another such run's workdir, followed back)."""
  path, seen = config.model.init, set()
  while path and path not in seen:
    seen.add(path)
    for folder in (path, os.path.dirname(os.path.normpath(path))):
      if is_folder(folder):
        return folder
    if not os.path.isfile(os.path.join(path, "config.json")):
      break
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      path = (json.load(f).get("model") or {}).get("init", "")
  raise UserError(f"{where}: no diffusers pipeline folder behind its model.init={config.model.init!r}, so there "
                  "are no text encoders, VAE or scheduler to export with its denoiser. Fix: export a run that "
                  "fine-tunes a pipeline (configs/sd15.py, configs/pixart_sigma.py), or `export safetensors` for "
                  "the model alone")


def exportable(config, where: str, is_folder) -> str:
  """The source pipeline folder (`is_folder` says which are) of a model its diffusers pipeline runs: its own text
  encoder read whole (conditioner identity), guided as that pipeline guides; anything else refused by name."""
  source = source_pipeline(config, where, is_folder)
  exportable_text(config, where, source, config_checks.tower_names(config))
  return source


def transformer_parts(src: str, dtype, transformer, vae, text) -> dict:
  """{component: (conversion family, checked conversion)} of a transformer family's pipeline folder for `convert
  diffusers`: its transformer/, vae/ and text_encoder/ by those conversion families."""
  return {"transformer": (transformer, transformer.Conversion.prepare(os.path.join(src, "transformer"), dtype)),
          "vae": (vae, vae.Conversion.prepare(os.path.join(src, "vae"), dtype)),
          "text_encoder": (text, hf_text.Conversion.prepare(os.path.join(src, "text_encoder"), dtype))}


def export_transformer_pipeline(backend, out: str, save, source: str, transformer, text) -> None:
  """Write a transformer family's model into the (new) folder `out` as its diffusers pipeline folder, from the
  pipeline folder `source`: `transformer` = (class name, params -> (its config, its state dict)) of the denoiser;
  the autoencoder as the backend holds it; `text` = (tower name, its text family, transformers' class name, the
  config file that trains it) of the one text encoder; the source's tokenizer, scheduler config and options."""
  f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  net_class, to_diffusers = transformer
  save(os.path.join(out, "transformer"), *to_diffusers(f32(backend.params["model"]["denoiser"])),
       "diffusion_pytorch_model.safetensors")
  conversion, ae_class, _ = autoencoder.KINDS[backend.setup.config.autoencoder.kind]
  ae = conversion.to_diffusers(backend.setup.autoencoder.module.cfg, f32(backend.params["frozen"]["autoencoder"]))
  save(os.path.join(out, "vae"), *ae, "diffusion_pytorch_model.safetensors")
  name, kind, text_class, config_file = text
  tower = tower_of(backend, name, kind, config_file)
  save(os.path.join(out, "text_encoder"), *kind.to_hf(tower.module.cfg, f32(backend.params["frozen"]["towers"][name])),
       "model.safetensors")
  finish_export(source, out, {
      "transformer": ["diffusers", net_class], "vae": ["diffusers", ae_class],
      "text_encoder": ["transformers", text_class],
      "tokenizer": ["transformers", copy_tokenizer(source, out, "tokenizer")]})


def exportable_text(config, where: str, source: str, tower_names) -> None:
  """A model diffusers' pipeline samples reads the source folder's own text encoders' features (conditioner
  identity), guided as that pipeline guides (the empty prompt, or zeros with force_zeros_for_empty_prompt)."""
  have = (config.conditioner.kind, config.conditioner.null)
  if have[0] != "identity" or have[1] == "learned":
    raise UserError(f"{where}: conditioner.kind / conditioner.null = {have}; a diffusers pipeline is a denoiser "
                    "reading its text encoders' features, guided by the empty prompt or zeros ('identity', "
                    "'empty_prompt' or 'zeros'). Fix: `export safetensors` for this model")
  want = null(index(source))
  if config.conditioner.null != want:
    raise UserError(f"{where}: conditioner.null={config.conditioner.null!r}, but {source}'s pipeline guides with "
                    f"{want!r} (its force_zeros_for_empty_prompt), so diffusers would not draw this model's images. "
                    f"Fix: train with --config.conditioner.null={want}")
  towers = [os.path.abspath(config.text.towers[n].init) for n in tower_names]
  if any(os.path.commonpath([t, os.path.abspath(source)]) != os.path.abspath(source) for t in towers):
    raise UserError(f"{where}: its text towers {towers} are not the text encoders of {source}, the pipeline it "
                    "started from. Fix: train with the pipeline's own text encoder(s)")


def tower_of(backend, name: str, kind, config_file: str):
  """The backend's text tower `name`, refused by name unless it is of text family `kind` (the pipeline's)."""
  tower = next(t for t in backend.setup.towers if t.name == name)
  if tower.kind is not kind:
    raise UserError(f"text tower {name} is a {tower.kind.__name__} tower, not the pipeline's text encoder. Fix: "
                    f"export a run of {config_file}")
  return tower


def lora_names(plan: dict):
  """(path, layer) -> the module names LoRA files give a kernel of a transformer converted by `plan`: diffusers'
  (`transformer.` + its state-dict module: `transformer.transformer_blocks.0.attn1.to_q`); others as
  `export safetensors` names them."""
  def names(path, layer=None) -> list[str]:
    src = plan.get(tuple(path[1:])) if path[0] == "denoiser" else None
    if src is None:
      return [torch_view.module_key(path, layer)]
    key = src.keys[layer if src.stacked else 0]
    return ["transformer." + (key if isinstance(key, str) else key[0]).rpartition(".")[0]]
  return names


def copy_tokenizer(source: str, out: str, name: str) -> str:
  """The source's tokenizer folder `name` saved into `out`; its class name (model_index.json's entry)."""
  tokenizer = prompt.load_tokenizer(os.path.join(source, name))
  tokenizer.save_pretrained(os.path.join(out, name))
  return type(tokenizer).__name__


def finish_export(source: str, out: str, written: dict) -> None:
  """The source's scheduler config and a model_index.json for `written` ({component: [library, class]}, the rest
  of the source's index: options kept, absent components null) into `out`."""
  idx = index(source)
  os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
  with open(os.path.join(source, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
    scheduler = json.load(f)
  with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
    json.dump(scheduler, f, indent=2)
  new = {"_class_name": idx.get("_class_name"), "_diffusers_version": idx.get("_diffusers_version", "0.30.0"),
         **written, "scheduler": ["diffusers", scheduler.get("_class_name")]}
  for key, value in idx.items():  # pipeline options (force_zeros_for_empty_prompt, ...), absent parts as null
    if key not in new and not key.startswith("_"):
      new[key] = [None, None] if isinstance(value, list) else value
  with open(os.path.join(out, "model_index.json"), "w", encoding="utf-8") as f:
    json.dump(new, f, indent=2)
