"""Where the frozen text towers meet the denoiser of the config's family (`denoisers`).

The towers (`TextTower`) run once per prompt; their parameters stay in their dtype and out of the optimizer.
`build_model`, `abstract_inputs`, `abstract_params` and `param_report` go through the family's contract and
name no family. Run `python -m lidit_jax.model --config configs/lidit_1b.py` for parameter counts.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lidit_jax import denoisers, configs as configs_lib, prompt as prompt_lib, sharding as sharding_lib
from lidit_jax.configs import tower_names  # noqa: F401  (model.tower_names, for callers)
from lidit_jax.convert import hf_llm, hf_text
from lidit_jax.models import llm

Dtype = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class TextTower:
  """A frozen text model with its tokenizer and the hidden state the conditioner reads (`layer`), or all of
  them (`all_layers`: features [B, L, num_layers + 1, D], token-major so that masks and shardings of [B, L]
  fit them as they fit one layer)."""
  name: str
  kind: Any  # its text family (hf_llm, hf_t5, hf_clip): how its module is made and its output read
  module: nn.Module
  encoder: prompt_lib.PromptEncoder
  layer: int
  dtype: Dtype
  hidden_size: int
  source: str  # "random" or the checkpoint directory
  num_layers: int = 0
  all_layers: bool = False
  final_norm: bool = False  # the final LayerNorm on the chosen layer (CLIP: SD 1.x / 2.x)
  pooled: bool = False  # the projected pooled output instead, [B, 1, P] (hidden_size: P; CLIP with projection)
  scores: str | None = None  # per-block scores instead of states (output="scores", LLMs): the `alone` reading

  @property
  def feature_shape(self) -> tuple[int, ...]:
    """Features of one prompt: (L, D), or (L, num_layers + 1, D) with all_layers."""
    if self.pooled:
      return (1, self.hidden_size)
    length = self.encoder.max_length
    return (length, self.num_layers + 1, self.hidden_size) if self.all_layers else (length, self.hidden_size)

  def features(self, params, input_ids, attention_mask):
    out = self.module.apply({"params": params}, input_ids, attention_mask)
    hidden = self.kind.tower_output(self.module, params, out, self)
    if self.all_layers:
      hidden = jnp.moveaxis(hidden, 0, 2)  # [N + 1, B, L, D] -> [B, L, N + 1, D]
    return jax.lax.stop_gradient(hidden)

  def encode(self, params, tokens):
    """The features of an encoder's output (input_ids, attention_mask; with a token selection the tower's own
    token_mask and the positions the features keep, select)."""
    hidden = self.features(params, tokens["input_ids"], tokens.get("token_mask", tokens["attention_mask"]))
    if "select" in tokens:
      hidden = jax.vmap(lambda h, keep: h[keep])(hidden, tokens["select"])
    return hidden


def tower_spec(tc, where: str, words=()):
  """(converter family, model config) of a tower: from its fields for a random tower (`words`: the word
  tokenizer's vocabulary, `text.words`), else from the checkpoint directory's config (Hugging Face or
  converted). Reads JSON only, no weights."""
  if tc.init == "random":
    if tc.kind != "llama":
      raise ValueError(f"{where}.kind={tc.kind!r}: random towers are Llama-style; use kind='llama' or set "
                       f"{where}.init to a checkpoint directory.")
    return hf_llm, random_llama_config(tc, words)
  return hf_text.read_family_and_config(tc.init, where=f"{where}.init")


def build_towers(config) -> list[TextTower]:
  towers = []
  for name in tower_names(config):
    tc, where = config.text.towers[name], f"text.towers.{name}"
    fam, cfg = tower_spec(tc, where, config.text.words)
    n = cfg.num_layers
    if not -(n + 1) <= tc.layer <= n:
      raise ValueError(f"{where}.layer={tc.layer} is outside the {n + 1} hidden states of {tc.init}. "
                       f"Fix: pick an index in [-{n + 1}, {n}] (LI-DiT: -3).")
    tokenizer = tc.tokenizer or ("words" if tc.init == "random" else tc.init)
    tok = prompt_lib.load_tokenizer(tokenizer, extra_words=config.text.words)
    if len(tok) > cfg.vocab_size:
      raise ValueError(f"{where}.tokenizer={tokenizer!r} has {len(tok)} tokens but the model's vocabulary has "
                       f"{cfg.vocab_size}. Fix: use the tokenizer saved with {tc.init}.")
    instruction = config.text.instruction if tc.instruction is None else tc.instruction
    encoder = prompt_lib.PromptEncoder(tok, tc.max_length, instruction or None,
                                       config.text.use_chat_template, config.text.padding_side,
                                       mask_padding=tc.mask_padding, lowercase=tc.lowercase,
                                       separator=tc.separator, selection=tc.selection,
                                       instruct_negatives=tc.instruct_negatives)
    towers.append(make_tower(name, tc, fam, cfg, encoder))
  return towers


def make_tower(name, tc, fam, cfg, encoder) -> TextTower:
  """The tower of section `tc`, read as it asks (`output`, `final_norm`) if its text family gives that reading."""
  for reading, wanted in ((tc.output, True), ("final_norm", tc.final_norm)):
    if wanted and reading not in fam.READINGS:
      givers = [f.__name__.rsplit(".", 1)[-1] for f in map(hf_text.family, hf_text.FAMILIES) if reading in f.READINGS]
      what = "final_norm=True" if reading == "final_norm" else f"output={reading!r}"
      raise ValueError(f"text.towers.{name}.{what}: {tc.init} is a {fam.__name__.rsplit('.', 1)[-1]} tower, which "
                       f"does not give it. Fix: use a tower of {' / '.join(givers)}, or drop it")
  module, width = fam.tower_module(cfg, DTYPES[tc.dtype], tc)
  scores = tc.output == "scores"  # shaped as every hidden state
  return TextTower(name, fam, module, encoder, tc.layer, DTYPES[tc.dtype], width, tc.init, cfg.num_layers,
                   tc.all_layers or scores, tc.final_norm, tc.output == "pooled", tc.alone if scores else None)


def abstract_towers(config) -> list[TextTower]:
  """Towers without tokenizers (encoder=None), architecture from planned_towers: compile-only set-ups."""
  return [make_tower(name, config.text.towers[name], fam, cfg, None)
          for name, (fam, cfg) in planned_towers(config).items()]


def abstract_tower_params(towers: list[TextTower], mesh, rules) -> dict:
  """ShapeDtypeStructs (with shardings) of the towers' parameters."""
  out = {}
  for t in towers:
    boxed = hf_text.abstract_params(t.module)
    shardings = sharding_lib.fit_to_shapes(boxed, mesh, rules)
    out[t.name] = jax.tree.map(lambda a, sh, dt=t.dtype: jax.ShapeDtypeStruct(a.shape, dt, sharding=sh),
                               hf_text.strip_boxes(boxed), shardings)
  return out


def random_llama_config(tc, words=()) -> llm.DecoderConfig:
  vocab = tc.vocab_size
  if not vocab:  # the word tokenizer's size is known only once it is built
    vocab = len(prompt_lib.load_tokenizer(tc.tokenizer or "words", extra_words=words))
  return llm.DecoderConfig(vocab_size=vocab, hidden_size=tc.hidden_size,
                           num_layers=tc.num_layers, num_heads=tc.num_heads, num_kv_heads=tc.num_kv_heads,
                           intermediate_size=tc.intermediate_size, rope_theta=tc.rope_theta)


def load_tower_params(config, towers: list[TextTower], mesh=None, rules=()):
  """Frozen tower parameters in their dtype, sharded by their logical axes when a mesh is given.
  Random towers are recreated from the seed, so no checkpoint needs to store them."""
  out, loaded = {}, {}
  rng = jax.random.key(config.seed + 1)
  for i, t in enumerate(towers):
    same = (t.source, t.dtype, repr(getattr(t.module, "cfg", None)))  # configs may hold lists
    if t.source != "random" and same in loaded:  # SDXL's second encoder, read for its states and its pooled output
      out[t.name] = out[loaded[same]]
    elif t.source == "random":
      ids = jnp.zeros((1, t.encoder.max_length), jnp.int32)
      abstract = jax.eval_shape(t.module.init, rng, ids, ids)["params"]
      shardings = None if mesh is None else sharding_lib.fit_to_shapes(abstract, mesh, rules)
      init = jax.jit(lambda r, ids=ids, m=t.module, dt=t.dtype: jax.tree.map(
          lambda p: p.astype(dt), nn.unbox(m.init(r, ids, jnp.ones_like(ids))["params"])), out_shardings=shardings)
      out[t.name] = init(jax.random.fold_in(rng, i))
    else:
      # final_norm: a Hugging Face CLIP folder read with its head, as the tower's module has it
      adapt = (lambda _, m=t.module: m.cfg) if t.final_norm or t.pooled else None
      out[t.name] = hf_text.load_hf_text_model(t.source, t.dtype, mesh, rules, adapt=adapt)[1]
      loaded[same] = t.name
  return out


def attention_implementation(config, platform: str | None = None) -> str:
  """model.attention resolved for this machine. "auto": cuDNN's fused kernel on GPUs in 16-bit, Pallas
  splash attention on TPUs when the image and text token counts are multiples of 128 (its block size),
  XLA elsewhere. An explicit "splash" runs every call its blocks tile and XLA's kernel for the others
  (PixArt-Sigma's self-attention over 4096 image tokens beside its 300 caption keys). An explicit kernel the
  platform cannot run is refused rather than silently replaced."""
  platform = platform or jax.devices()[0].platform
  want, half = config.model.attention, config.model.dtype in ("bfloat16", "float16")
  image_tokens = denoisers.geometry(config).image_tokens
  text_tokens = sum(config.text.towers[n].max_length for n in tower_names(config))
  blocks_fit = image_tokens % 128 == 0 and text_tokens % 128 == 0
  if want == "auto":
    if platform == "gpu" and half:
      return "cudnn"
    return "splash" if platform == "tpu" and blocks_fit else "xla"
  if want == "cudnn" and (platform != "gpu" or not half):
    raise ValueError(f"model.attention='cudnn' needs a GPU and model.dtype bfloat16 (this process: {platform}, "
                     f"{config.model.dtype}). Fix: --config.model.attention=auto (or xla).")
  if want == "splash" and platform != "tpu":
    raise ValueError(f"model.attention='splash' needs a TPU (this process: {platform}). "
                     "Fix: --config.model.attention=auto (or xla).")
  return want


def build_model(config, platform: str | None = None) -> nn.Module:
  """The trainable denoiser of `model.family`, with the attention kernel of `platform` (default: this process')."""
  return denoisers.build(config, attention_implementation(config, platform))


def latent_shape(config) -> tuple[int, int, int]:
  return denoisers.latent_hwc(config)


def text_shapes(config, tower_dims: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, ...]]:
  """Each tower's feature shape without the batch: (length, width), or (length, num_layers + 1, width) with
  `all_layers`. `tower_dims`: each tower's (hidden_size, num_layers); the config's fields unless given."""
  names = tower_names(config)
  dims = tower_dims or [(config.text.towers[n].hidden_size, config.text.towers[n].num_layers) for n in names]
  out = []
  for n, (d, layers) in zip(names, dims):
    tc = config.text.towers[n]
    if tc.output == "pooled":  # one vector, of the projection's width (`tower_dims` gives it)
      out.append((1, d))
      continue
    every = tc.all_layers or tc.output == "scores"
    out.append((tc.max_length, layers + 1, d) if every else (tc.max_length, d))
  return out


def abstract_inputs(config, batch_size: int, tower_dims: Sequence[tuple[int, int]] | None = None):
  """ShapeDtypeStructs of one denoiser call (for eval_shape / compile without data). With
  conditioner.null=empty_prompt no example is dropped inside the model (its text is swapped first), so the model
  has no learned null context."""
  inputs = denoisers.family(config).abstract_inputs(batch_size, latent_shape(config), text_shapes(config, tower_dims))
  if config.conditioner.null == "empty_prompt":
    inputs["drop_B"] = None
  return inputs


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def planned_towers(config) -> dict:
  """{name: (family, model config)} of the configured towers, from their checkpoints when these exist and
  from the config's architecture fields otherwise (planning a run before converting anything)."""
  out = {}
  for name in tower_names(config):
    tc = config.text.towers[name]
    missing = tc.init != "random" and not os.path.isdir(os.path.expanduser(tc.init))
    if missing and tc.get("plan_arch"):
      arch = tc.plan_arch.to_dict()
      fam = hf_text.family_for(arch, f"text.towers.{name}.plan_arch")
      out[name] = fam, fam.config_from_hf(arch)
      continue
    if missing:
      missing = tc.tokenizer not in ("", "words") and not os.path.isdir(os.path.expanduser(tc.tokenizer))
      tc = ml_collections.ConfigDict({**tc.to_dict(), "init": "random", **({"tokenizer": ""} if missing else {})})
    out[name] = tower_spec(tc, f"text.towers.{name}", config.text.words)
  return out


def tower_dims(config, towers: dict) -> list[tuple[int, int]]:
  """(feature width, num_layers) of each planned tower (`planned_towers`): a pooled output is the projection's."""
  return [(getattr(cfg, "projection_dim", 0) or cfg.hidden_size if config.text.towers[n].output == "pooled"
           else cfg.hidden_size, cfg.num_layers)
          for n, (_, cfg) in towers.items()]


def abstract_params(config, towers: dict | None = None):
  """Boxed abstract parameters of the trainable model (logical axes kept), allocating nothing."""
  towers = towers or planned_towers(config)
  inputs = abstract_inputs(config, 1, tower_dims(config, towers))
  # the attention kernel changes no shape: XLA's, so that a splash config plans on any host
  model = denoisers.build(config, "xla")
  return jax.eval_shape(lambda kw: model.init(jax.random.key(0), **kw), inputs)["params"]


def param_report(config) -> dict:
  """Parameter counts by component, from abstract shapes only (nothing is allocated)."""
  towers = planned_towers(config)
  groups = denoisers.family(config).param_groups(nn.unbox(abstract_params(config, towers)))
  report = {k: count_params(v) for k, v in groups.items()}
  report["trainable total"] = sum(report.values())
  for name, (fam, cfg) in towers.items():
    abstract = hf_text.abstract_params(fam.make_module(cfg, jnp.float32))
    report[f"frozen text model {name}"] = count_params(hf_text.strip_boxes(abstract))
  return report


def main(argv):
  config = configs_lib.load_from_flags()
  for k, v in param_report(config).items():
    print(f"{k:>28}: {v:>15,d}  ({v / 1e9:.3f} B)")


if __name__ == "__main__":
  from lidit_jax import cli
  from lidit_jax import configs as _configs
  _configs.define_flags()
  from absl import flags
  flags.declare_key_flag("config")
  cli.run(main)
