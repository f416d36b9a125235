"""Config defaults, validation, and loading (`--config path.py[:variant]` plus `--config.a.b=value`).

Experiment files under `configs/` start from `base_config()` and change what they need. Every config is
validated before any compute: a bad value is refused with a message naming it and the fix.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re

import ml_collections
from etils import epath

from lidit_jax import cli
from lidit_jax.cli import UserError, warn
from lidit_jax.config_checks import ConfigError, fail, one_of  # noqa: F401  (configs.ConfigError, for callers)
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


def tower(**overrides) -> ml_collections.ConfigDict:
  """One frozen text tower. `init`: "random" (a random Llama-style tower built from the fields below, the
  demo's) or a local directory: a Hugging Face model (config.json + safetensors) or the output of
  `python -m lidit_jax.convert hf-text`; its architecture then comes from that directory and the fields
  kind .. rope_theta are ignored. `tokenizer`: "" (the demo's word tokenizer for random towers, else the
  one in `init`), "words", or a local tokenizer directory. `layer`: which hidden state LI-DiT reads;
  `all_layers`: every hidden state instead, [B, L, num_layers + 1, D] (for conditioners that read them all).
  Stable Diffusion's text side: `final_norm` applies a CLIP tower's final LayerNorm to the chosen layer (SD 1.x /
  2.x read layer -1 so normed: last_hidden_state; diffusers' clip_skip normed earlier layers); `mask_padding=False`
  runs the tower and gives the context every position, padding included, as SD's pipelines run CLIP;
  `output="pooled"`: the end-of-text token's normed, projected state instead (CLIPTextModelWithProjection's
  text_embeds, SDXL's pooled vector), features [B, 1, P], which conditioner identity hands to the U-Net.
  `output="scores"` (decoder-only LLM towers): the LLM Diff Adapter's per-block scores, [B, L, num_layers + 1, D]
  (entry 0 the embedding output, entry t block t's update with context minus its update of the token alone;
  `alone`: "diagonal", the same block with attention to the token itself, or "trajectory", a context-free run;
  models/llm.DecoderLM). The tower then runs about twice its FLOPs."""
  t = ml_collections.ConfigDict(dict(
      kind="llama", init="random", tokenizer="", vocab_size=0,
      hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=192, rope_theta=10000.0,
      layer=-3,  # LI-DiT reads the third-to-last block's output
      all_layers=False,  # give every hidden state (the embeddings, then each block's output) instead
      final_norm=False,  # CLIP only: its final LayerNorm on the chosen layer
      output="hidden",  # or "pooled": a CLIP with projection's pooled output [B, 1, P] (SDXL's text_embeds)
                        # or "scores": an LLM's per-block scores (the Diff Adapter's), read as `alone` says
      alone="diagonal",
      instruction=None,  # this tower's own text before the prompt (LLM4GEN's T5: "pre"); None: text.instruction
      mask_padding=True,  # False: no padding mask in the tower or the context (SD's CLIP)
      # config.json fields (model_type, sizes) the planner assumes while `init` does not exist yet, for a tower
      # the Llama fields above cannot describe (SD's CLIP, LLM4GEN's T5): `plan` before converting anything
      plan_arch={},
      max_length=64, dtype="bfloat16"))
  t.update(overrides)
  return t


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = dict(family="lidit",  # the denoiser family (lidit_jax/denoisers: one file each)
                 init="",  # a training workdir: start from its latest EMA weights (fine-tuning)
                 init_skip=(),  # regexes of parameter names ("denoiser/...") that model.init leaves fresh
                 width=128, depth=4, num_heads=4, patch_size=2, mlp_ratio=4.0, qk_norm=True,
                 pos_embed="resblock", remat="none", scan=True, dtype="float32",
                 modulation="block",  # adaLN-Zero per block (LI-DiT), or "single" (PixArt-alpha's adaLN-single)
                 attention="auto",  # DiT attention: auto (cuDNN on GPU in bf16, splash on TPU, else XLA), xla,
                                    # cudnn, splash
                 refiner=dict(depth=2, num_heads=4, mlp_ratio=4.0, causal=False, gated=True, fusion="collaborative",
                              rope=False, feature_norm=False))
  # rope: rotary word positions in the token refiners; feature_norm: the LLM features RMS-normalised (no weights)
  # before the refiner reads them, so a tower's scale cannot swamp the timestep in c. Neither is in the paper.
  # model.family=unet: the SD U-Net (diffusers' UNet2DConditionModel fields; per-block ones as tuples or one value)
  c.unet = dict(block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
                num_heads=8, transformer_layers_per_block=1, cross_attention_dim=768, norm_num_groups=32,
                use_linear_projection=False,
                addition_embed_type="",  # "text_time": SDXL's pooled text + size / crop ids (a tower with output
                addition_time_embed_dim=0,  # "pooled" gives the text; the ids are the image size, uncropped)
                projection_class_embeddings_input_dim=0,
                # a conditioner's second context (the Diff Adapter's code): a new cross-attention beside each
                # original one, mixed a1 exp(b1) orig + a2 exp(b2) new, a = (1, 0), b = 0 at init (the U-Net
                # unchanged): "per_layer" mixes, or one "global" mix
                second_attention="per_layer")
  # tower features -> the denoiser's context (lidit_jax/conditioners): LI-DiT's "refiners" (options in
  # model.refiner), plain "tokens" (each tower projected to the width) or "identity" (the features themselves,
  # towers side by side: SD's CLIP). null: classifier-free guidance's unconditional context, "learned" (a
  # parameter) or "empty_prompt" (the towers' features of "": caption dropout trains on them, sampling guides with
  # them or a negative prompt; what diffusers' SD pipelines do, so such a model exports to them) or "zeros" (zero
  # context and pooled vector, a negative prompt's features when one is given: SDXL's force_zeros_for_empty_prompt)
  c.conditioner = dict(kind="refiners", null="learned",
                       # kind=llm4gen: LLM4GEN's Cross-Adapter Module (conditioners/llm4gen.py; released values)
                       cam=dict(clip="clip", llm="t5", num_blocks=1, num_heads=8, lam=1.0, llm_first=False,
                                mask_llm=False, init="", allow_pickle=False),
                       # kind=diff_adapter: the LLM Diff Adapter (conditioners/diff_adapter.py: the open readings)
                       diff=dict(llm="llm", start="embedding", learn_g=True, g_init=1.0, noise="train",
                                 noise_init=1e-4))
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
                buckets=False,  # aspect-ratio buckets around image_size**2 pixels, else square centre crops
                aspect_ratios=(0.5, 0.6667, 0.75, 1.0, 1.3333, 1.5, 2.0),  # width / height, one bucket each
                workers=0,  # grain worker processes, each building whole batches (0: in the training process)
                threads=16,  # decoding threads per batch
                prefetch=2)  # batches read ahead (per worker process)
  # vae: path = a diffusers VAE / pipeline folder, an original single file or a converted directory; frozen
  # identity (pixels), patches (pixels as factor x factor patches, 3 factor^2 channels) or vae (autoencoder.py)
  c.autoencoder = dict(kind="identity", factor=1, channels=3, path="", dtype="float32")
  c.objective = dict(kind="rectified_flow")  # lidit_jax/objectives: rectified_flow reads `flow`, ddpm `ddpm`
  c.flow = dict(prediction="velocity",  # the network's output: "velocity", or "x0" (the clean image; flow.as_velocity)
                x0_t_min=0.05,  # x0: t is clipped below at this value when turning the output into a velocity
                loss="velocity",  # the MSE of the velocity, or of the clean image it implies ("x0": weight t^2)
                timestep="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                shift=1.0, resolution_shift=False,
                unshifted=0.0)  # fraction of training times drawn without the shift (both ends trained)
  # DDPM (objective.kind=ddpm): diffusers' scheduler_config.json names, SD 1.x's values by default
  c.ddpm = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon",  # or v_prediction (SD 2.x 768 px) or sample
                timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                clip_sample_range=1.0, rescale_betas_zero_snr=False, use_karras_sigmas=False,
                eta=0.0,  # DDIM's noise at each step (0: deterministic)
                snr_gamma=0.0,  # > 0: min-SNR-gamma loss weights (5.0 is the paper's)
                offset_noise=0.0,  # > 0: per-channel offset added to the training noise (e.g. 0.05)
                # the keys a pipeline folder's scheduler set (the rest: its class's defaults); another sampler
                # keeps these and takes its own class's defaults for the rest. Empty: every key is kept
                scheduler_keys=())
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
                 # resuming with a changed objective / prediction / schedule / tower / family / conditioner is
                 # refused unless True (then recorded in WORKDIR/config.json's history)
                 allow_config_change=False)
  c.sample = dict(steps=30, sampler="euler", cfg=4.0, num_images=4,
                  shift=0.0,  # time shift of the sampling steps (samples and eval); 0 = the training shift
                  prompts=("a red circle to the left of a blue square",
                           "a green triangle above a yellow circle",
                           "a blue square below a red triangle",
                           "a yellow square to the right of a green circle"))
  c.eval = dict(num_prompts=128, steps=30, cfg=4.0, batch_size=64,
                probe_pairs=32)  # relation probe: pairs of objects drawn with each relation word (0: off)
  c.mesh = dict(data=1, fsdp=1, tensor=1,  # within one slice (or all devices); -1 = the rest
                dcn_data=1, dcn_fsdp=1)  # multi-slice pods: slices along data / fsdp
  c.sharding_rules = DEFAULT_RULES
  return c


def read_saved(workdir: str) -> ml_collections.ConfigDict:
  """A run's saved config.json, validated, with the fields the code gained since it was written at their
  defaults (so a run of an older version still samples and exports)."""
  return validate(ml_collections.ConfigDict(saved_fields(workdir)))


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
  fill(saved, base_config().to_dict())
  for t in saved["text"]["towers"].values():
    fill(t, tower().to_dict())
  return saved


def tower_names(config) -> list[str]:
  """The towers `text.use` names, in order."""
  return [n.strip() for n in config.text.use.split(",") if n.strip()]


def validate(c: ml_collections.ConfigDict, data: bool = True) -> ml_collections.ConfigDict:
  """Checks everything that can be checked without compute; raises ValueError naming value and fix. `data=False`
  leaves out that the training data exist (sampling a config's model reads none)."""
  m = c.model
  for key, value in (("model.patch_size", m.patch_size), ("train.num_steps", c.train.num_steps),
                     ("train.batch_size", c.train.batch_size), ("train.log_every", c.train.log_every),
                     ("train.grad_accum", c.train.grad_accum),
                     ("train.checkpoint_every", c.train.checkpoint_every), ("sample.steps", c.sample.steps),
                     ("train.sample_every", c.train.sample_every)):
    if value < 1:
      fail(key, value, "must be at least 1", "set a positive value")
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
  from lidit_jax import denoisers, objectives
  one_of("model.family", m.family, set(denoisers.FAMILIES))
  one_of("objective.kind", c.objective.kind, set(objectives.OBJECTIVES))
  from lidit_jax.models.layers import REMAT_POLICIES
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
  denoisers.family(c).validate(c, names)  # the family's own sections (LI-DiT: model.*)
  from lidit_jax import conditioners
  one_of("conditioner.kind", c.conditioner.kind, set(conditioners.CONDITIONERS))
  one_of("conditioner.null", c.conditioner.null, {"learned", "empty_prompt", "zeros"})
  conditioners.conditioner(c).validate(c, names)  # its own (the refiners: model.refiner.*)

  ae = c.autoencoder
  one_of("autoencoder.kind", ae.kind, {"identity", "patches", "vae"})
  one_of("autoencoder.dtype", ae.dtype, {"float32", "bfloat16"})
  if ae.kind == "identity" and (ae.factor != 1 or ae.channels != 3):
    fail("autoencoder.factor/channels", (ae.factor, ae.channels), "pixel space (identity) means factor 1, 3 channels",
          "set --config.autoencoder.factor=1 --config.autoencoder.channels=3")
  if ae.kind == "patches" and (ae.factor < 1 or ae.channels != 3 * ae.factor ** 2):
    fail("autoencoder.factor/channels", (ae.factor, ae.channels), "patches of factor f hold 3 f^2 channels",
          f"set --config.autoencoder.channels={3 * max(1, ae.factor) ** 2} (factor {max(1, ae.factor)})")
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

  objectives.objective(c).validate(c)  # its own section and samplers (rectified flow: flow.*, sample.*)
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
  import ast
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
  from ml_collections import config_flags
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
  import difflib
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
  from absl import flags, logging
  from ml_collections import config_flags
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
