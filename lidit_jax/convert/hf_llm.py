"""Decoder-only LLMs from Hugging Face: Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 2.

config.json is read through transformers' config classes (no weights, no torch), so their defaults and
legacy spellings (`rope_scaling` vs `rope_parameters`, derived `layer_types`) resolve exactly as the
reference resolves them. Anything that changes the math and that we do not implement is refused.
`to_hf` is the inverse (export): the config and weights of transformers' base model of the family.
"""
from __future__ import annotations

import dataclasses

import transformers

from lidit_jax.convert import safetensors_io as io
from lidit_jax.convert.registry import strip_boxes, token_abstract_params as abstract_params  # noqa: F401
from lidit_jax.convert.safetensors_io import Source, heads_bias, with_inverse
from lidit_jax.models import llm

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
ANCHORS = ("embed_tokens.weight",)
IGNORED = ("lm_head.",)
Config = llm.DecoderConfig

ROPE_TYPES = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def _refuse(key: str, value, why: str):
  raise ValueError(f"config.json {key}={value!r}: {why}")


def config_from_hf(hf: dict) -> llm.DecoderConfig:
  fields = {k: v for k, v in hf.items() if k not in ("model_type", "transformers_version", "architectures")}
  c = transformers.AutoConfig.for_model(hf["model_type"], **fields)
  t = c.model_type
  rope = dict(getattr(c, "rope_parameters", None) or {})
  theta = rope.pop("rope_theta", getattr(c, "rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ROPE_TYPES:
    _refuse("rope_type", kind, f"this RoPE scaling is not implemented (supported: {sorted(ROPE_TYPES)}).")
  scaling = (("rope_type", kind),) + tuple((k, float(rope[k])) for k in ROPE_TYPES[kind])
  if getattr(c, "partial_rotary_factor", 1.0) not in (None, 1.0):
    _refuse("partial_rotary_factor", c.partial_rotary_factor, "only full rotary embeddings are implemented.")
  act_name = getattr(c, "hidden_activation", None) or c.hidden_act
  if act_name not in ACTIVATIONS:
    _refuse("hidden_act", act_name, f"supported: {sorted(ACTIVATIONS)}.")
  if getattr(c, "use_bidirectional_attention", None):
    _refuse("use_bidirectional_attention", True, "only causal decoders are implemented.")

  layer_types = getattr(c, "layer_types", None)
  window = getattr(c, "sliding_window", None) or 0
  if t == "mistral":  # Mistral applies its window (if any) to every layer
    windows = (window,) * c.num_hidden_layers
  elif layer_types:
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
      _refuse("layer_types", unknown, "only full_attention and sliding_attention layers are implemented.")
    windows = tuple(window if lt == "sliding_attention" else 0 for lt in layer_types)
  else:
    windows = ()
  if any(windows) and not window:
    _refuse("sliding_window", window, "sliding layers need a window size.")

  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  bias = bool(getattr(c, "attention_bias", False))
  gemma = t == "gemma2"
  return llm.DecoderConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
      num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
      intermediate_size=c.intermediate_size, head_dim=head_dim, rope_theta=float(theta),
      rope_scaling=scaling if kind != "default" else (), norm_eps=float(c.rms_norm_eps),
      qkv_bias=True if t == "qwen2" else bias, out_bias=False if t == "qwen2" else bias,
      mlp_bias=bool(getattr(c, "mlp_bias", False)), qk_norm=t == "qwen3", activation=ACTIVATIONS[act_name],
      embed_scale=gemma, norm_unit_offset=gemma, sandwich_norms=gemma,
      attn_softcap=getattr(c, "attn_logit_softcapping", None) if gemma else None,
      query_scale=float(c.query_pre_attn_scalar) if gemma else None,
      windows=windows if any(windows) else ())


def make_module(cfg: llm.DecoderConfig, dtype, output_layer: int | None = None) -> llm.DecoderLM:
  return llm.DecoderLM(cfg, dtype, output_layer)


# As a frozen text tower (`model.TextTower`): the hidden states, or the Diff Adapter's per-block scores.
READINGS = ("hidden", "scores")


def tower_module(cfg: llm.DecoderConfig, dtype, tc) -> tuple[llm.DecoderLM, int]:
  """(module, feature width) for the tower section `tc`: a decoder keeps only the wanted layer as it goes."""
  module = make_module(cfg, dtype)
  if tc.output == "scores":  # every block's score, shaped as every hidden state
    return module.clone(alone=tc.alone), cfg.hidden_size
  return (module if tc.all_layers else module.clone(output_layer=tc.layer)), cfg.hidden_size


def tower_output(module, params, out, tower):
  return out  # already the kept layer, or every state / score stacked


def _heads_out_rows(num_heads: int):
  """q/k/v weight [H*K, D] <-> kernel [H, K, D]: a reshape both ways, so loading stays a view."""
  return with_inverse(lambda w: w.reshape(num_heads, -1, w.shape[-1]), lambda k: k.reshape(-1, k.shape[-1]))


def _heads_in_columns(num_heads: int):
  """o_proj weight [D, H*K] <-> kernel [D, H, K]."""
  return with_inverse(lambda w: w.reshape(w.shape[0], num_heads, -1), lambda k: k.reshape(k.shape[0], -1))


def plan(cfg: llm.DecoderConfig) -> dict:
  n, h, g = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads

  def per_layer(name, *transform):  # no transform: Source's identity, which has its inverse
    return Source.layers("layers.{}." + name, n, *transform)

  p = {("embed_tokens",): Source.one("embed_tokens.weight"),
       ("norm", "scale"): Source.one("norm.weight")}
  norms = {"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm"}
  if cfg.sandwich_norms:  # Gemma 2 names: post_attention_layernorm is the one *after* attention
    norms = {"input_norm": "input_layernorm", "post_attn_out_norm": "post_attention_layernorm",
             "post_attn_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
  for ours, theirs in norms.items():
    p[("layers", ours, "scale")] = per_layer(f"{theirs}.weight")
  # Our decoder kernels are in PyTorch's [out, in] order: reshapes only (views, no copies).
  for ours, theirs, heads in (("query", "q_proj", h), ("key", "k_proj", g), ("value", "v_proj", g)):
    p[("layers", "attn", ours, "kernel")] = per_layer(f"self_attn.{theirs}.weight", _heads_out_rows(heads))
    if cfg.qkv_bias:
      p[("layers", "attn", ours, "bias")] = per_layer(f"self_attn.{theirs}.bias", heads_bias(heads))
  p[("layers", "attn", "out", "kernel")] = per_layer("self_attn.o_proj.weight", _heads_in_columns(h))
  if cfg.out_bias:
    p[("layers", "attn", "out", "bias")] = per_layer("self_attn.o_proj.bias")
  if cfg.qk_norm:
    p[("layers", "attn", "q_norm", "scale")] = per_layer("self_attn.q_norm.weight")
    p[("layers", "attn", "k_norm", "scale")] = per_layer("self_attn.k_norm.weight")
  for name in ("gate_proj", "up_proj", "down_proj"):
    p[("layers", "mlp", name, "kernel")] = per_layer(f"mlp.{name}.weight")
    if cfg.mlp_bias:
      p[("layers", "mlp", name, "bias")] = per_layer(f"mlp.{name}.bias")
  return p


# Export: our activation names as transformers writes them, and the base model class of each type.
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
BASE_CLASSES = {"llama": "LlamaModel", "mistral": "MistralModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model",
                "gemma2": "Gemma2Model"}


def export_model_type(cfg: llm.DecoderConfig) -> str:
  """The model_type `to_hf` writes `cfg` as, from the switches only one family has: gemma2 for Gemma's
  norms or embedding scale, qwen3 for per-head q/k norms, qwen2 for q/k/v biases without an output bias,
  mistral for sliding windows, llama otherwise. A Mistral without a window is written as llama: the same
  math, and llama's config also spells out attention and MLP biases, which Mistral's cannot."""
  if cfg.sandwich_norms or cfg.embed_scale or cfg.norm_unit_offset:
    return "gemma2"
  if cfg.qk_norm:
    return "qwen3"
  if cfg.qkv_bias and not cfg.out_bias:
    return "qwen2"
  return "mistral" if cfg.windows else "llama"


def _int_if_whole(x):
  """transformers' strict configs type some of these as int (query_pre_attn_scalar, context lengths)."""
  return int(x) if float(x).is_integer() else x


def to_hf(cfg: llm.DecoderConfig, params) -> tuple[dict, dict]:
  """(config.json dict, state dict) of the decoder as transformers' base model of `export_model_type(cfg)`
  (Gemma2Model, LlamaModel, ...: keys without "model.", no LM head): the inverse of `plan` (export).

  The config is checked by reading it back with `config_from_hf`: a DecoderConfig whose mix of switches
  no supported type has (Gemma's norms with q/k norms, windows of different sizes, an output bias alone)
  is refused, naming the fields that would not survive."""
  n = cfg.num_layers
  # Fields config_from_hf always fills in, spelled out here so the read-back compares equal (same math).
  want = dataclasses.replace(cfg, head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads)
  t = export_model_type(want)
  gemma = t == "gemma2"
  if gemma and want.query_scale is None:  # None is the 1/sqrt(head_dim) default
    want = dataclasses.replace(want, query_scale=float(want.head_dim))
  if want.activation not in HF_ACTIVATIONS:
    raise ValueError(f"activation {want.activation!r} has no transformers name; exportable: {sorted(HF_ACTIVATIONS)}")

  # transformers 5 writes RoPE as `rope_parameters` (theta inside); config_from_hf reads it back from there.
  rope = {k: _int_if_whole(v) if k == "original_max_position_embeddings" else v for k, v in want.rope_scaling}
  rope = {"rope_type": "default", **rope, "rope_theta": want.rope_theta}
  config = {"architectures": [BASE_CLASSES[t]], "model_type": t, "vocab_size": want.vocab_size,
            "hidden_size": want.hidden_size, "intermediate_size": want.intermediate_size, "num_hidden_layers": n,
            "num_attention_heads": want.num_heads, "num_key_value_heads": want.num_kv_heads,
            "head_dim": want.head_dim, "rms_norm_eps": want.norm_eps, "rope_parameters": rope,
            "hidden_activation" if gemma else "hidden_act": HF_ACTIVATIONS[want.activation]}
  windows = want.windows or (0,) * n
  window = max(windows)  # one size in every type's config: differing sizes fail the read-back below
  layer_types = ["sliding_attention" if w else "full_attention" for w in windows]
  if t == "llama":
    config.update(attention_bias=want.qkv_bias, mlp_bias=want.mlp_bias)
  elif t == "mistral":  # Mistral's window applies to every layer
    config.update(sliding_window=window)
  elif t in ("qwen2", "qwen3"):
    # layer_types is what transformers 5 reads; max_window_layers (the first sliding layer) is what older
    # versions derive it from, right when the sliding layers are the last ones.
    config.update(use_sliding_window=bool(window), sliding_window=window or None, layer_types=layer_types,
                  max_window_layers=next((i for i, w in enumerate(windows) if w), n))
    if t == "qwen3":
      config.update(attention_bias=want.qkv_bias)
  else:
    config.update(attention_bias=want.qkv_bias, query_pre_attn_scalar=_int_if_whole(want.query_scale),
                  attn_logit_softcapping=want.attn_softcap, sliding_window=window or None, layer_types=layer_types)

  back = config_from_hf(config)
  if back != want:
    lost = {f.name: (getattr(want, f.name), getattr(back, f.name)) for f in dataclasses.fields(want)
            if getattr(want, f.name) != getattr(back, f.name)}
    raise ValueError(f"this DecoderConfig cannot be written as transformers model_type {t!r}: fields (ours, as "
                     f"read back) {lost}. Fix: export only configs of the llama, mistral, qwen2, qwen3 or gemma2 "
                     "families (as config_from_hf produces them)")
  return config, io.to_state_dict(plan(cfg), strip_boxes(params))
