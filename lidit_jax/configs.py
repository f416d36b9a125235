"""Config defaults, validation, and loading (`--config path.py[:variant]` plus `--config.a.b=value`).

Experiment files under `configs/` start from `base_config()` and change what they need. Every config is
validated before any compute: a bad value is refused with a message naming it and the fix.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import json
import math
import os
import re

import ml_collections
from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from lidit_jax import autoencoder, cli, conditioners, denoisers, lora, objectives, resolution_bins
from lidit_jax.cli import UserError, warn
from lidit_jax.config_checks import ConfigError, fail, one_of, tower, tower_names  # noqa: F401  (for callers)
from lidit_jax.models.layers import REMAT_POLICIES
from lidit_jax.prompt import LIDIT_INSTRUCTION

# Logical axis -> mesh axis. Parameters are sharded over fsdp (their `embed` dim) and tensor (heads / mlp).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", ("fsdp", "tensor")),  # an mlp axis alone (biases, modulation) is sharded like a kernel's rows
    ("mlp", "tensor"),  # next to embed (which takes fsdp), mlp gets tensor
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("depth", None),  # one value per tower block (a layer mix, the Diff Adapter's g and h): not a scanned stack
    ("patch", None),
    ("cond", None),
    ("conv_in", None),  # VAE channels: frozen and small, replicated unless a config maps them
    ("conv_out", None),
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = dict(family=denoisers.DEFAULT,  # the denoiser family (lidit_jax/denoisers: one file each, owning its fields)
                 init="",  # a training workdir: start from its latest EMA weights (fine-tuning)
                 init_skip=(),  # regexes of parameter names ("denoiser/...") that model.init leaves fresh
                 remat="none", dtype="float32",
                 attention="auto")  # auto (cuDNN on GPU in bf16, splash on TPU, else XLA), xla, cudnn, splash
  # tower features -> the denoiser's context (lidit_jax/conditioners). null: classifier-free guidance's
  # unconditional context, "learned" (a parameter) or "empty_prompt" (the towers' features of "": caption dropout
  # trains on them, sampling guides with them or a negative prompt; what diffusers' SD pipelines do, so such a
  # model exports to them) or "zeros" (zero context and pooled vector, a negative prompt's features when one is
  # given: SDXL's force_zeros_for_empty_prompt)
  c.conditioner = dict(kind=conditioners.DEFAULT, null="learned")
  c.text = dict(use="llama_a,llama_b", instruction=LIDIT_INSTRUCTION, use_chat_template=True,
                padding_side="right", drop_instruction=True,
                words=(),  # the "words" tokenizer's vocabulary besides its fixed words (configs/shapes.py: the demo's)
                cache="",  # a `python -m lidit_jax.encode_prompts` output: train without running the LLMs;
                           # "memory": run them once per caption and keep the features in host memory
                towers=dict(llama_a=tower(), llama_b=tower(hidden_size=96, num_layers=5, num_heads=4,
                                                           num_kv_heads=4, intermediate_size=256)))
  c.data = dict(source="shapes",  # shapes (the embedded demo), tfds (`python -m lidit_jax.data.prepare`) or
                                 # features (latents from `python -m lidit_jax.data.latents`)
                image_size=32, caption_dropout=0.1,
                max_objects=3,  # shapes only
                # tfds: dataset NAME in DATA_DIR, read with grain
                name="", data_dir="", split="train",
                eval_split="",  # train.eval_every's held-out split (tfds; the demo: its held-out compositions)
                buckets=False,  # aspect-ratio buckets around image_size**2 pixels, else square centre crops
                aspect_ratios=(0.5, 0.6667, 0.75, 1.0, 1.3333, 1.5, 2.0),  # width / height, one bucket each
                workers=0,  # grain worker processes, each building whole batches (0: in the training process)
                threads=16,  # decoding threads per batch
                prefetch=2)  # batches read ahead (per worker process)
  c.objective = dict(kind=objectives.DEFAULT)  # lidit_jax/objectives: each reads its own section
  c.optim = dict(lr=1e-4,
                 warmup_steps=1000,  # clipped to a tenth of the run (with a warning) when not below num_steps
                 min_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                 grad_clip=1.0,  # global gradient norm; 0 = no clipping
                 ema_decay=0.9999)
  c.train = dict(num_steps=100_000, batch_size=256, log_every=50, checkpoint_every=1000, keep_checkpoints=3,
                 keep_every=0,  # > 0: also keep every checkpoint whose step is a multiple, for good
                 grad_accum=1,  # micro-batches per step (same update, less activation memory)
                 freeze=(),  # regexes of parameter names not trained (no update, no optimizer state)
                 sample_every=5000,
                 eval_every=0,  # > 0: the held-out loss (metrics.jsonl / TensorBoard val_loss) every this many steps
                 eval_batches=2,  # held-out batches of train.batch_size it averages (read once, fixed draws)
                 # resuming with a changed objective / prediction / schedule / tower / family / conditioner is
                 # refused unless True (then recorded in WORKDIR/config.json's history)
                 allow_config_change=False)
  # LoRA (rank > 0): low-rank factors beside the `targets` kernels train, the model's own weights (model.init's,
  # else the seed's initialisation) stay frozen outside the optimizer; checkpoints hold the factors only
  c.lora = dict(rank=0,
                alpha=0.0,  # the factors' scale is alpha / r (0: alpha = r, a scale of 1)
                targets=(),  # regexes over kernel names; (): the family's and conditioner's defaults (attention)
                conv_rank=0,  # > 0: convolutions the targets match get pairs of this rank too (LoCon)
                dropout=0.0)  # of A's input features, one draw per kernel and step (lora.merge)
  c.sample = dict(steps=30, sampler="euler", cfg=4.0, num_images=4,
                  shift=0.0,  # time shift of the sampling steps (samples and eval); 0 = the training shift
                  cfg_renorm=False,  # guided prediction rescaled to the conditional's norm (Lumina 2's cfg_normalization)
                  cfg_trunc=1.0,  # guidance on this fraction of the first steps only (Lumina 2's cfg_trunc_ratio)
                  resolution_bins=0,  # > 0: sizes drawn at this base size's aspect-ratio bins (PixArt, Sana), 0: as asked
                  prompts=("a red circle to the left of a blue square",
                           "a green triangle above a yellow circle",
                           "a blue square below a red triangle",
                           "a yellow square to the right of a green circle"))
  c.eval = dict(num_prompts=128, steps=30, cfg=4.0, batch_size=64,
                probe_pairs=32,  # relation probe: pairs of objects drawn with each relation word (0: off)
                # train.eval_every's image metrics (validation.py), each off when its weights are not given:
                fid_inception="",  # pytorch-fid's FID Inception weights (.safetensors; .pth refused: a pickle)
                fid_reference="",  # pytorch-fid .npz statistics to compare with ("": the held-out batches' images)
                clip="",  # a Hugging Face CLIP folder: CLIP score of the images against their captions
                metric_images=256,  # images drawn for them, from the first held-out captions
                image_size=0)  # their size (0: the model's sampling default)
  c.mesh = dict(data=1, fsdp=1, tensor=1,  # within one slice (or all devices); -1 = the rest
                dcn_data=1, dcn_fsdp=1)  # multi-slice pods: slices along data / fsdp
  c.sharding_rules = DEFAULT_RULES
  # Every registered plugin's own section (its defaults, in its file), whichever a config picks: `--config.unet.*`
  # works before a file sets model.family, and every run's config.json has one layout.
  for plugin in plugins():
    _add(c, getattr(plugin, "CONFIG_DEFAULTS", {}))
  return c


def plugins() -> list:
  """Every registered denoiser family, conditioner and objective module, and the autoencoder's."""
  return [*(importlib.import_module(m) for registry in (denoisers.FAMILIES, conditioners.CONDITIONERS,
                                                         objectives.OBJECTIVES) for m in registry.values()), autoencoder]


def _add(node: ml_collections.ConfigDict, section: dict) -> None:
  for key, value in section.items():
    if isinstance(value, dict) and key in node:
      _add(node[key], value)
    else:
      node[key] = value


def read_saved(workdir: str) -> ml_collections.ConfigDict:
  """A run's saved config.json, validated, with the fields the code gained since it was written at their
  defaults (so a run of an older version still samples and exports)."""
  return validate(ml_collections.ConfigDict(saved_fields(workdir)))


def migrate(saved: dict) -> dict:
  """A saved config of an earlier layout in today's, in place: each plugin moves the fields it took into its own
  section since (`migrate` in its file), keeping the values the run was trained with; a field missing altogether
  gets its default afterwards (saved_fields)."""
  for plugin in plugins():
    if hasattr(plugin, "migrate"):
      plugin.migrate(saved)
  return saved


def saved_fields(workdir: str) -> dict:
  """WORKDIR/config.json as a dict, without its `history` (resume.py), with missing fields at their defaults."""

  def fill(d: dict, defaults: dict) -> None:
    for k, v in defaults.items():
      if k not in d:
        d[k] = v
      elif isinstance(v, dict) and isinstance(d[k], dict) and k != "towers":  # towers: a run's own names
        fill(d[k], v)
  saved = json.loads((epath.Path(workdir) / "config.json").read_text(encoding="utf-8"))
  saved.pop("history", None)
  migrate(saved)
  fill(saved, base_config().to_dict())
  for t in saved["text"]["towers"].values():
    fill(t, tower().to_dict())
  return saved


def validate(c: ml_collections.ConfigDict, data: bool = True) -> ml_collections.ConfigDict:
  """`c` checked for everything that can be checked without compute, as a new config (`c` is not changed; a
  warmup longer than the run comes back shortened); raises ValueError naming value and fix. `data=False` leaves
  out that the training data exist (sampling a config's model reads none)."""
  c = c.copy_and_resolve_references()
  m = c.model
  for key, value in (("train.num_steps", c.train.num_steps),
                     ("train.batch_size", c.train.batch_size), ("train.log_every", c.train.log_every),
                     ("train.grad_accum", c.train.grad_accum),
                     ("train.checkpoint_every", c.train.checkpoint_every), ("sample.steps", c.sample.steps),
                     ("train.sample_every", c.train.sample_every)):
    if value < 1:
      fail(key, value, "must be at least 1", "set a positive value")
  if c.train.eval_every < 0 or c.train.eval_batches < 1:
    key, value = ("train.eval_every", c.train.eval_every) if c.train.eval_every < 0 else ("train.eval_batches",
                                                                                         c.train.eval_batches)
    fail(key, value, "must be >= 0 (eval_every) / >= 1 (eval_batches)", "set e.g. eval_every=1000, eval_batches=4")
  if c.train.eval_every and c.data.source != "shapes" and not c.data.eval_split:
    fail("data.eval_split", c.data.eval_split, "is needed by train.eval_every (the held-out loss reads a split the run "
         "does not train on)", "set --config.data.eval_split=validation (a split of the prepared dataset), or "
         "train.eval_every=0")
  e = c.eval
  for key, path in (("eval.fid_inception", e.fid_inception), ("eval.fid_reference", e.fid_reference),
                    ("eval.clip", e.clip)):
    if path and not os.path.exists(os.path.expanduser(path)):
      fail(key, path, "does not exist", "point at a local file / folder, or leave it empty (that metric off)")
  if (e.fid_inception or e.clip) and e.metric_images < 2:
    fail("eval.metric_images", e.metric_images, "must be at least 2 (FID needs a covariance)", "use e.g. 256")
  if e.fid_inception and not e.fid_reference and c.data.source == "features":
    fail("eval.fid_reference", e.fid_reference, "is needed: the held-out batches hold latents, not images",
         "pass pytorch-fid .npz statistics of real images (python -m lidit_jax.metrics fid IMAGES --save_stats X.npz)")
  if not 0.0 <= c.sample.cfg_trunc <= 1.0:
    fail("sample.cfg_trunc", c.sample.cfg_trunc, "must be a fraction of the steps in [0, 1]", "use 1.0 (guide every step)")
  if c.sample.resolution_bins not in (0, *resolution_bins.SIZES):
    fail("sample.resolution_bins", c.sample.resolution_bins, "has no table of aspect-ratio bins",
         f"use one of {resolution_bins.SIZES}, or 0 to draw the size asked")
  if c.train.keep_checkpoints < 1:  # Orbax's max_to_keep=0 deletes every checkpoint, the new one too
    fail("train.keep_checkpoints", c.train.keep_checkpoints, "must be at least 1 (the newest checkpoint is what a "
         "run resumes from)", "keep 1 or more; train.keep_every > 0 also keeps every multiple of it for good")
  if c.train.keep_every < 0:
    fail("train.keep_every", c.train.keep_every, "must be >= 0", "use 0 (off) or a step multiple, e.g. 10000")
  for key, patterns in (("model.init_skip", m.init_skip), ("train.freeze", c.train.freeze)):
    for rx in patterns:
      try:
        re.compile(rx)
      except re.error as e:
        fail(key, rx, f"is not a regular expression ({e})", "fix the pattern, e.g. 'denoiser/'")
  one_of("model.family", m.family, set(denoisers.FAMILIES))
  one_of("objective.kind", c.objective.kind, set(objectives.OBJECTIVES))
  one_of("model.remat", m.remat, set(REMAT_POLICIES))
  one_of("model.dtype", m.dtype, {"float32", "bfloat16"})
  one_of("model.attention", m.attention, {"auto", "xla", "cudnn", "splash"})

  names = tower_names(c)
  if not names:
    fail("text.use", c.text.use, "names no LLM tower", f"name one or more of {sorted(c.text.towers)}")
  for n in names:
    if n not in c.text.towers:
      fail("text.use", c.text.use, f"tower {n!r} is not defined in text.towers", f"use names from {sorted(c.text.towers)}")
    t = c.text.towers[n]
    # Checkpoint towers: architecture and layer range are checked against their config.json at setup.
    if t.init == "random" and not -(t.num_layers + 1) <= t.layer <= t.num_layers:
      fail(f"text.towers.{n}.layer", t.layer, f"outside the {t.num_layers + 1} hidden states of this tower",
            f"pick an index in [-{t.num_layers + 1}, {t.num_layers}] (LI-DiT: -3)")
    if t.init == "random" and (t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads):
      fail(f"text.towers.{n}.num_heads", t.num_heads,
            f"hidden_size {t.hidden_size} / num_heads / num_kv_heads {t.num_kv_heads} do not divide evenly",
            "make hidden_size a multiple of num_heads and num_heads a multiple of num_kv_heads")
    one_of(f"text.towers.{n}.dtype", t.dtype, {"float32", "bfloat16"})
    one_of(f"text.towers.{n}.output", t.output, {"hidden", "pooled", "scores"})
    one_of(f"text.towers.{n}.alone", t.alone, {"diagonal", "trajectory"})
  one_of("text.padding_side", c.text.padding_side, {"left", "right"})
  autoencoder.validate(c.autoencoder)  # its own section, before the family reads its factor
  denoisers.validate(c)  # the family's own section, and the image size against its unit
  one_of("conditioner.kind", c.conditioner.kind, set(conditioners.CONDITIONERS))
  one_of("conditioner.null", c.conditioner.null, {"learned", "empty_prompt", "zeros"})
  conditioners.validate(c, denoisers.geometry(c))  # its own section

  one_of("data.source", c.data.source, {"shapes", "tfds", "features"})
  if data and c.data.source in ("tfds", "features") and not (c.data.name and c.data.data_dir):
    fail("data.name/data_dir", (c.data.name, c.data.data_dir), f"data.source={c.data.source!r} needs both",
          "prepare a dataset (python -m lidit_jax.data.prepare --src IMAGES --out DIR --name NAME), then pass "
          "--config.data.name=NAME --config.data.data_dir=DIR")
  if c.data.buckets and (not c.data.aspect_ratios or min(c.data.aspect_ratios) <= 0):
    fail("data.aspect_ratios", c.data.aspect_ratios, "buckets need positive width / height ratios",
          "use e.g. (0.75, 1.0, 1.3333)")
  for key in ("workers", "threads", "prefetch"):
    if c.data[key] < 0:
      fail(f"data.{key}", c.data[key], "must be >= 0", "use 0 (workers) or a positive number")
  if c.data.prefetch < 1:
    fail("data.prefetch", c.data.prefetch, "must be >= 1 batch", "use e.g. 2")
  if not 0.0 <= c.data.caption_dropout < 1.0:
    fail("data.caption_dropout", c.data.caption_dropout, "must be in [0, 1)", "use e.g. 0.1")

  objectives.validate(c)  # its own section and sampler names
  lora.validate(c.lora)
  if c.lora.rank and c.train.freeze:
    warn(f"train.freeze={tuple(c.train.freeze)} has no effect with lora.rank={c.lora.rank}: only the LoRA factors "
         "train, every model weight is frozen")
  o = c.optim
  if o.lr <= 0 or not math.isfinite(o.lr):
    fail("optim.lr", o.lr, "must be a positive number", "use e.g. 1e-4")
  if o.warmup_steps < 0:
    fail("optim.warmup_steps", o.warmup_steps, "must be >= 0", "use 0 for no warmup")
  if o.warmup_steps >= c.train.num_steps:  # a short run (--config.train.num_steps=20) just works
    clipped = c.train.num_steps // 10
    warn(f"optim.warmup_steps={o.warmup_steps} is not below train.num_steps={c.train.num_steps}: warming up "
         f"for {clipped} steps instead (a tenth of the run); set --config.optim.warmup_steps to choose")
    o.warmup_steps = clipped
  if o.grad_clip < 0:
    fail("optim.grad_clip", o.grad_clip, "must be >= 0", "use 0 for no clipping, or a positive global norm (e.g. 1.0)")
  if not 0.0 <= o.ema_decay < 1.0:
    fail("optim.ema_decay", o.ema_decay, "must be in [0, 1)", "use e.g. 0.999")
  for ax in ("data", "fsdp", "tensor"):
    if c.mesh[ax] < 1 and c.mesh[ax] != -1:
      fail(f"mesh.{ax}", c.mesh[ax], "must be >= 1 or -1 (fill with the remaining devices)", "fix the mesh shape")
  for ax in ("dcn_data", "dcn_fsdp"):
    if c.mesh[ax] < 1:
      fail(f"mesh.{ax}", c.mesh[ax], "must be >= 1 (the number of slices along that axis)", "use 1 for one slice")
  return c


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Set dotted keys, e.g. {"model.refiner.depth": 0}, as `--config.model.refiner.depth=0` does: unknown keys
  and values of another type are refused (ConfigDict's own type check). Not `update_from_flattened_dict`: it
  adds an unknown leaf key (`model.widht`) silently."""
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or last not in node:
      raise ConfigError(f"config has no key {key!r}. Fix: check its spelling against the config file "
                        "(configs/*.py and lidit_jax/configs.py:base_config)")
    try:
      node[last] = value
    except TypeError as e:
      raise ConfigError(f"config {key}={value!r}: {e}. Fix: give a value of the key's type") from None
  return c


def parse_overrides(items) -> dict:
  """["model.depth=6", "text.instruction=Describe the objects:"] -> {key: value}: Python literals where they
  parse (numbers, True, tuples), else the text itself."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"override {item!r} is not KEY=VALUE. Fix: write e.g. model.depth=6")
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Load `path.py` or `path.py:arg` the way `--config` does (arg is passed to get_config)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist. Fix: pass an existing file, e.g. "
                      "--config configs/shapes.py (a variant after a colon: configs/shapes.py:tiny)")
  spec_ = importlib.util.spec_from_file_location("_lidit_config", path)
  mod = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def define_flags(default: str | None = None):
  """`--config path.py[:variant]` with `--config.key=value` overrides (unknown keys are refused)."""
  cli.explain_flag_error = explain_flag_error
  config_flags.DEFINE_config_file("config", default, "Experiment config file, e.g. configs/shapes.py (or "
                                  "configs/shapes.py:tiny). Override any field with --config.a.b=value, e.g. "
                                  "--config.optim.lr=3e-4; unknown fields are refused.", lock_config=True)


def _config_args(argv) -> tuple[str | None, list[str]]:
  """The --config spec and the keys of the --config.* overrides in a command line."""
  spec, keys, args = None, [], list(argv[1:])
  for i, a in enumerate(args):
    name, eq, value = a[2:].partition("=")
    if a.startswith("--") and name == "config":
      spec = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    elif a.startswith("--config."):
      keys.append(name[len("config."):])
  return spec, keys


def explain_flag_error(argv, error: Exception) -> str:
  """One message for a command line that did not parse: a missing config file, an unknown --config.* key,
  a value of the wrong type, or absl's own flag errors."""
  spec, keys = _config_args(argv)
  if spec is not None:
    try:
      c = load_config_file(spec)
    except UserError as e:
      return str(e)
    except Exception as e:  # the file itself is broken: say so, whatever it raised
      return f"cannot load config {spec!r}: {type(e).__name__}: {e}"
    for key in keys:
      node, parts = c, key.split(".")
      for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
          known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
          where = ".".join(parts[:depth]) or "the config"
          close = difflib.get_close_matches(part, known, n=1)
          hint = f"did you mean {'.'.join(parts[:depth] + close)!r}? " if close else ""
          return (f"unknown config key {key!r} in --config.{key}: {where} has no field {part!r}. Fix: {hint}"
                  f"the fields of {where} are {', '.join(known) or '(none)'}")
        node = node[part]
  message = str(error).strip() or type(error).__name__
  return f"bad command line: {message}. Fix: see --help for the flags and their types"


def load_from_flags(data: bool = True) -> ml_collections.ConfigDict:
  """The --config of the command line, validated (`data=False`: a sampling command needs no training data)."""
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines out of the progress bar
  if flags.FLAGS["config"].value is None:
    raise ConfigError("--config is required. Fix: pass e.g. --config configs/shapes.py")
  # ml_collections defers a config file's load error to the first use: load it again to say what failed.
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  try:
    config = flags.FLAGS.config
    config.keys()
  except Exception as e:
    load_config_file(spec)  # raises the clear message for a missing file, else the file's own error
    raise ConfigError(f"cannot load config {spec!r}: {e}") from e
  return validate(config, data)
