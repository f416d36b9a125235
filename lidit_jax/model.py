"""Where the text towers, the refiners and the DiT meet.

`LIDiT` is the trainable denoiser: per-LLM token refiners -> collaborative refiner (or plain
concatenation) -> instruction tokens masked out -> DiT with cross-attention to the text. The frozen
LLM towers (`TextTowers`) live outside it: they run once per prompt, their parameters stay in bf16 and
out of the optimizer. Run `python -m lidit_jax.model --config configs/lidit_1b.py` for parameter counts.
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

from lidit_jax import flow
from lidit_jax import prompt as prompt_lib
from lidit_jax import sharding as sharding_lib
from lidit_jax.models import dit as dit_lib
from lidit_jax.models import layers, llm, refiner

Dtype = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class LIDiT(nn.Module):
  dit: dit_lib.DiTConfig
  refiner_depth: int = 2
  refiner_heads: int = 8
  refiner_mlp_ratio: float = 4.0
  refiner_causal: bool = False
  refiner_gated: bool = True
  refiner_rope: bool = False  # rotary word positions in the token refiners' self-attention
  fusion: str = "collaborative"  # or "concat"
  drop_instruction: bool = True
  dtype: Dtype = jnp.float32

  def encode_text(self, feats: Sequence[jax.Array], valids: Sequence[jax.Array], prompts: Sequence[jax.Array],
                  t_emb_BD: jax.Array):
    """Refine each LLM's features; returns context [B, S, D] and its validity mask [B, S]."""
    w = self.dit.width
    xs, cs, vs = [], [], []
    for i, (f, v, pm) in enumerate(zip(feats, valids, prompts)):
      x, c = refiner.TokenRefiner(w, self.refiner_depth, self.refiner_heads, self.refiner_mlp_ratio,
                                  causal=self.refiner_causal,
                                  gated=self.refiner_gated, qk_norm=self.dit.qk_norm,
                                  rope_theta=10000.0 if self.refiner_rope else None, dtype=self.dtype,
                                  name=f"token_refiner_{i}")(f, v, pm, t_emb_BD)
      xs.append(x), cs.append(c), vs.append(v.astype(bool))
    if self.fusion == "collaborative":
      xs = refiner.CollaborativeRefiner(self.refiner_heads, self.refiner_mlp_ratio, qk_norm=self.dit.qk_norm,
                                        dtype=self.dtype,
                                        name="collaborative_refiner")(xs, vs, cs)
    # Static shapes under jit: instruction tokens are masked, never sliced away.
    keep = [v & pm.astype(bool) if self.drop_instruction else v for v, pm in zip(vs, prompts)]
    return jnp.concatenate(xs, axis=1), jnp.concatenate(keep, axis=1)

  @nn.compact
  def __call__(self, x_BHWC, t_B, feats, valids, prompts, drop_B=None):
    """Velocity prediction. `drop_B` (bool) replaces an example's text by the learned null context (CFG)."""
    t_emb = layers.TimestepEmbedder(self.dit.width, dtype=self.dtype, name="t_embedder")(t_B)
    ctx, ctx_valid = self.encode_text(feats, valids, prompts, t_emb)
    if drop_B is not None:
      null = self.param("null_context", layers.logical(nn.initializers.normal(0.02), ("length", "embed")),
                        ctx.shape[1:], jnp.float32).astype(ctx.dtype)
      d = drop_B[:, None]
      ctx = jnp.where(d[..., None], null[None], ctx)
      ctx_valid = jnp.where(d, True, ctx_valid)
    pooled = layers.masked_mean(ctx, ctx_valid)
    return dit_lib.DiT(self.dit, self.dtype, name="denoiser")(x_BHWC, t_emb, pooled, ctx, ctx_valid)


@dataclasses.dataclass
class TextTower:
  """A frozen text model with its tokenizer and the hidden state LI-DiT reads."""
  name: str
  module: nn.Module
  encoder: prompt_lib.PromptEncoder
  layer: int
  dtype: Dtype
  hidden_size: int
  source: str  # "random" or the checkpoint directory

  def features(self, params, input_ids, attention_mask):
    hidden = self.module.apply({"params": params}, input_ids, attention_mask)
    if getattr(self.module, "output_layer", None) is None:  # T5 / CLIP return every layer
      hidden = hidden[self.layer]
    return jax.lax.stop_gradient(hidden)


def tower_spec(tc, where: str):
  """(converter family, model config) of a tower: from its fields for a random tower, else from the
  checkpoint directory's config (Hugging Face or converted). Reads JSON only, no weights."""
  from lidit_jax.convert import hf_llm, hf_text
  if tc.init == "random":
    if tc.kind != "llama":
      raise ValueError(f"{where}.kind={tc.kind!r}: random towers are Llama-style; use kind='llama' or set "
                       f"{where}.init to a checkpoint directory.")
    return hf_llm, random_llama_config(tc)
  return hf_text.read_family_and_config(tc.init, where=f"{where}.init")


def build_towers(config) -> list[TextTower]:
  from lidit_jax.data import shapes  # the word tokenizer's vocabulary is the demo's
  towers = []
  for name in tower_names(config):
    tc, where = config.text.towers[name], f"text.towers.{name}"
    fam, cfg = tower_spec(tc, where)
    n = cfg.num_layers
    if not -(n + 1) <= tc.layer <= n:
      raise ValueError(f"{where}.layer={tc.layer} is outside the {n + 1} hidden states of {tc.init}. "
                       f"Fix: pick an index in [-{n + 1}, {n}] (LI-DiT: -3).")
    tokenizer = tc.tokenizer or ("words" if tc.init == "random" else tc.init)
    tok = prompt_lib.load_tokenizer(tokenizer, extra_words=shapes.VOCABULARY)
    if len(tok) > cfg.vocab_size:
      raise ValueError(f"{where}.tokenizer={tokenizer!r} has {len(tok)} tokens but the model's vocabulary has "
                       f"{cfg.vocab_size}. Fix: use the tokenizer saved with {tc.init}.")
    encoder = prompt_lib.PromptEncoder(tok, tc.max_length, config.text.instruction or None,
                                       config.text.use_chat_template, config.text.padding_side)
    dtype = DTYPES[tc.dtype]
    module = fam.make_module(cfg, dtype)
    if hasattr(module, "output_layer"):  # decoders can keep just the wanted layer as they go
      module = module.clone(output_layer=tc.layer)
    towers.append(TextTower(name, module, encoder, tc.layer, dtype, cfg.hidden_size, tc.init))
  return towers


def abstract_towers(config) -> list[TextTower]:
  """Towers without tokenizers (encoder=None), architecture from planned_towers: compile-only set-ups."""
  out = []
  for name, (fam, cfg) in planned_towers(config).items():
    tc = config.text.towers[name]
    module = fam.make_module(cfg, DTYPES[tc.dtype])
    if hasattr(module, "output_layer"):
      module = module.clone(output_layer=tc.layer)
    out.append(TextTower(name, module, None, tc.layer, DTYPES[tc.dtype], cfg.hidden_size, tc.init))
  return out


def abstract_tower_params(towers: list[TextTower], mesh, rules) -> dict:
  """ShapeDtypeStructs (with shardings) of the towers' parameters."""
  from lidit_jax.convert import hf_text
  out = {}
  for t in towers:
    boxed = hf_text.abstract_params(t.module)
    shardings = sharding_lib.fit_to_shapes(boxed, mesh, rules)
    out[t.name] = jax.tree.map(lambda a, sh, dt=t.dtype: jax.ShapeDtypeStruct(a.shape, dt, sharding=sh),
                               hf_text.strip_boxes(boxed), shardings)
  return out


def random_llama_config(tc) -> llm.DecoderConfig:
  vocab = tc.vocab_size
  if not vocab:  # the word tokenizer's size is known only once it is built
    from lidit_jax.data import shapes
    vocab = len(prompt_lib.load_tokenizer(tc.tokenizer or "words", extra_words=shapes.VOCABULARY))
  return llm.DecoderConfig(vocab_size=vocab, hidden_size=tc.hidden_size,
                           num_layers=tc.num_layers, num_heads=tc.num_heads, num_kv_heads=tc.num_kv_heads,
                           intermediate_size=tc.intermediate_size, rope_theta=tc.rope_theta)


def tower_names(config) -> list[str]:
  return [n.strip() for n in config.text.use.split(",") if n.strip()]


def load_tower_params(config, towers: list[TextTower], mesh=None, rules=()):
  """Frozen tower parameters in their dtype, sharded by their logical axes when a mesh is given.
  Random towers are recreated from the seed, so no checkpoint needs to store them."""
  from lidit_jax.convert import hf_text
  out = {}
  rng = jax.random.key(config.seed + 1)
  for i, t in enumerate(towers):
    if t.source == "random":
      ids = jnp.zeros((1, t.encoder.max_length), jnp.int32)
      abstract = jax.eval_shape(t.module.init, rng, ids, ids)["params"]
      shardings = None if mesh is None else sharding_lib.fit_to_shapes(abstract, mesh, rules)
      init = jax.jit(lambda r, ids=ids, m=t.module, dt=t.dtype: jax.tree.map(
          lambda p: p.astype(dt), nn.unbox(m.init(r, ids, jnp.ones_like(ids))["params"])), out_shardings=shardings)
      out[t.name] = init(jax.random.fold_in(rng, i))
    else:
      out[t.name] = hf_text.load_hf_text_model(t.source, t.dtype, mesh, rules)[1]
  return out


def attention_implementation(config, platform: str | None = None) -> str:
  """model.attention resolved for this machine. "auto": cuDNN's fused kernel on GPUs in 16-bit, Pallas
  splash attention on TPUs when the image and text token counts are multiples of 128 (its block size),
  XLA elsewhere. An explicit kernel the platform cannot run is refused rather than silently replaced."""
  platform = platform or jax.devices()[0].platform
  want, half = config.model.attention, config.model.dtype in ("bfloat16", "float16")
  image_tokens = (config.data.image_size // config.autoencoder.factor // config.model.patch_size) ** 2
  text_tokens = sum(config.text.towers[n].max_length for n in tower_names(config))
  blocks_fit = image_tokens % 128 == 0 and text_tokens % 128 == 0
  if want == "auto":
    if platform == "gpu" and half:
      return "cudnn"
    return "splash" if platform == "tpu" and blocks_fit else "xla"
  if want == "cudnn" and (platform != "gpu" or not half):
    raise ValueError(f"model.attention='cudnn' needs a GPU and model.dtype bfloat16 (this process: {platform}, "
                     f"{config.model.dtype}). Fix: --config.model.attention=auto (or xla).")
  if want == "splash" and (platform != "tpu" or not blocks_fit):
    raise ValueError(f"model.attention='splash' needs a TPU and image / text token counts that are multiples of "
                     f"128 (this process: {platform}; {image_tokens} image, {text_tokens} text tokens). "
                     "Fix: --config.model.attention=auto (or xla).")
  return want


def build_model(config) -> LIDiT:
  m = config.model
  dcfg = dit_lib.DiTConfig(width=m.width, depth=m.depth, num_heads=m.num_heads, patch_size=m.patch_size,
                           in_channels=config.autoencoder.channels, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
                           pos_embed=m.pos_embed, remat=m.remat, scan=m.scan, modulation=m.modulation,
                           attention=attention_implementation(config))
  r = m.refiner
  return LIDiT(dcfg, refiner_depth=r.depth, refiner_heads=r.num_heads, refiner_mlp_ratio=r.mlp_ratio,
               refiner_causal=r.causal,
               refiner_gated=r.gated, refiner_rope=r.rope, fusion=r.fusion, drop_instruction=config.text.drop_instruction,
               dtype=DTYPES[m.dtype])


def latent_shape(config) -> tuple[int, int, int]:
  s = config.data.image_size // config.autoencoder.factor
  return (s, s, config.autoencoder.channels)


def encode_images(config, images_BHWC):
  """uint8 images -> the autoencoder's latents, float32 [B, h, w, C] (pixel space: scaled to [-1, 1])."""
  if config.autoencoder.kind != "identity":
    raise NotImplementedError(f"autoencoder.kind={config.autoencoder.kind!r}: the VAE is not implemented yet. "
                              "Fix: encode with autoencoder.kind='identity' (pixel space).")
  return images_BHWC.astype(jnp.float32) / 127.5 - 1.0


def image_shift(config) -> float:
  """The flow's time shift for this config: fixed, or from the image token count (Flux rule)."""
  tokens = (config.data.image_size // config.autoencoder.factor // config.model.patch_size) ** 2
  return flow.effective_shift(config.flow, tokens)


def abstract_inputs(config, batch_size: int, tower_dims: Sequence[int] | None = None):
  """ShapeDtypeStructs of one denoiser call (for eval_shape / compile without data)."""
  names = tower_names(config)
  dims = tower_dims or [config.text.towers[n].hidden_size for n in names]
  lens = [config.text.towers[n].max_length for n in names]
  sds = jax.ShapeDtypeStruct
  b = batch_size
  return dict(
      x_BHWC=sds((b, *latent_shape(config)), jnp.float32), t_B=sds((b,), jnp.float32),
      feats=[sds((b, l, d), jnp.float32) for l, d in zip(lens, dims)],
      valids=[sds((b, l), jnp.bool_) for l in lens], prompts=[sds((b, l), jnp.bool_) for l in lens],
      drop_B=sds((b,), jnp.bool_))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def planned_towers(config) -> dict:
  """{name: (family, model config)} of the configured towers, from their checkpoints when these exist and
  from the config's architecture fields otherwise (planning a run before converting anything)."""
  out = {}
  for name in tower_names(config):
    tc = config.text.towers[name]
    if tc.init != "random" and not os.path.isdir(os.path.expanduser(tc.init)):
      tc = ml_collections.ConfigDict({**tc.to_dict(), "init": "random"})
    out[name] = tower_spec(tc, f"text.towers.{name}")
  return out


def abstract_params(config, towers: dict | None = None):
  """Boxed abstract parameters of the trainable model (logical axes kept), allocating nothing."""
  towers = towers or planned_towers(config)
  inputs = abstract_inputs(config, 1, [cfg.hidden_size for _, cfg in towers.values()])
  return jax.eval_shape(lambda kw: build_model(config).init(jax.random.key(0), **kw), inputs)["params"]


def param_report(config) -> dict:
  """Parameter counts by component, from abstract shapes only (nothing is allocated)."""
  from lidit_jax.convert import hf_text
  towers = planned_towers(config)
  report = {k: count_params(v) for k, v in nn.unbox(abstract_params(config, towers)).items()}
  report = {"denoiser (DiT)": report.pop("denoiser"),
            "refiners + embeddings": sum(report.values())}
  report["trainable total"] = sum(report.values())
  for name, (fam, cfg) in towers.items():
    abstract = hf_text.abstract_params(fam.make_module(cfg, jnp.float32))
    report[f"frozen text model {name}"] = count_params(hf_text.strip_boxes(abstract))
  return report


def main(argv):
  from lidit_jax import configs as configs_lib
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
