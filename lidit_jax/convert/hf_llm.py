"""Decoder-only LLMs from Hugging Face: Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 2.

config.json is read through transformers' config classes (no weights, no torch), so their defaults and
legacy spellings (`rope_scaling` vs `rope_parameters`, derived `layer_types`) resolve exactly as the
reference resolves them. Anything that changes the math and that we do not implement is refused.
"""
from __future__ import annotations

import transformers

from lidit_jax.convert.registry import token_abstract_params as abstract_params  # noqa: F401
from lidit_jax.convert.safetensors_io import Source, heads_bias
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


def plan(cfg: llm.DecoderConfig) -> dict:
  n, h, g = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads

  def per_layer(name, transform=lambda w: w):
    return Source.layers("layers.{}." + name, n, transform)

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
    p[("layers", "attn", ours, "kernel")] = per_layer(f"self_attn.{theirs}.weight",
                                                      lambda w, n=heads: w.reshape(n, -1, w.shape[-1]))
    if cfg.qkv_bias:
      p[("layers", "attn", ours, "bias")] = per_layer(f"self_attn.{theirs}.bias", heads_bias(heads))
  p[("layers", "attn", "out", "kernel")] = per_layer("self_attn.o_proj.weight",
                                                    lambda w: w.reshape(w.shape[0], h, -1))
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
