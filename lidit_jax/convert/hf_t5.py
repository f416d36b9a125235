"""T5 family (T5 v1.0, T5 v1.1 / Flan-T5, mT5) checkpoints -> `models.t5.T5Tower` (the encoder only).

Reads T5EncoderModel, T5Model and T5ForConditionalGeneration saves alike: the encoder's keys are the
same in all of them, and the decoder / LM head are skipped. uMT5 is not covered: it has a relative bias
table in every block, where T5 shares block 0's.
"""
from __future__ import annotations

import flax.linen as nn

from lidit_jax.convert import safetensors_io as io
from lidit_jax.convert.registry import strip_boxes, token_abstract_params as abstract_params  # noqa: F401
from lidit_jax.convert.safetensors_io import Source, heads_in, heads_out, linear
from lidit_jax.models import t5

MODEL_TYPES = ("t5", "mt5")
ANCHORS = ("encoder.final_layer_norm.weight",)
# The embedding is tied: transformers loads "shared.weight" into the encoder, so the encoder's own copy
# (present in some saves) is redundant.
IGNORED = ("decoder.", "lm_head.", "shared.", "encoder.embed_tokens.")

Config = t5.T5Config

# Values config.json leaves out fall back to the class defaults of the transformers config that wrote it
# (old T5 configs have no feed_forward_proj nor relative_attention_max_distance).
_DEFAULTS = {
    "t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
               feed_forward_proj="relu"),
    "mt5": dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                feed_forward_proj="gated-gelu"),
}


def config_from_hf(hf: dict) -> Config:
  model_type = hf.get("model_type")
  if model_type not in _DEFAULTS:
    raise ValueError(f"config.json: model_type={model_type!r} is not a T5 encoder we support; "
                     f"supported: {list(_DEFAULTS)}.")

  def get(key):
    value = hf.get(key)
    return _DEFAULTS[model_type][key] if value is None else value

  proj = get("feed_forward_proj")
  if proj not in t5.FEED_FORWARDS:
    raise ValueError(f"config.json: feed_forward_proj={proj!r} is not supported; supported: {list(t5.FEED_FORWARDS)} "
                     "(\"gated-gelu\" is the tanh-approximated GELU of T5 v1.1 / Flan-T5).")
  if hf.get("is_decoder"):
    raise ValueError("config.json: is_decoder=True describes a causal T5 stack; only the bidirectional encoder "
                     "is supported (is_decoder=False).")
  return Config(vocab_size=get("vocab_size"), d_model=get("d_model"), num_layers=get("num_layers"),
                num_heads=get("num_heads"), d_kv=get("d_kv"), d_ff=get("d_ff"), feed_forward=proj,
                num_buckets=get("relative_attention_num_buckets"),
                max_distance=get("relative_attention_max_distance"), eps=float(get("layer_norm_epsilon")))


def make_module(cfg: Config, dtype) -> nn.Module:
  return t5.T5Tower(cfg, dtype)


READINGS = ("hidden",)  # as a frozen text tower (`model.TextTower`)


def tower_module(cfg: Config, dtype, tc) -> tuple[nn.Module, int]:
  return make_module(cfg, dtype), cfg.hidden_size


def tower_output(module, params, out, tower):
  """`out`: every hidden state stacked [N + 1, B, L, D]."""
  return out if tower.all_layers else out[tower.layer]


def plan(cfg: Config) -> dict[tuple[str, ...], Source]:
  h = cfg.num_heads

  def block(suffix, *transform):  # one tensor per encoder block, stacked on the scanned axis
    return Source.layers("encoder.block.{}.layer." + suffix, cfg.num_layers, *transform)

  attn = "0.SelfAttention."
  p = {
      ("embed_tokens",): Source.one(("shared.weight", "encoder.embed_tokens.weight")),
      ("relative_attention_bias",): Source.one("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
      ("final_norm", "scale"): Source.one("encoder.final_layer_norm.weight"),
      ("layers", "attn_norm", "scale"): block("0.layer_norm.weight"),
      ("layers", "attn", "query", "kernel"): block(attn + "q.weight", heads_in(h)),
      ("layers", "attn", "key", "kernel"): block(attn + "k.weight", heads_in(h)),
      ("layers", "attn", "value", "kernel"): block(attn + "v.weight", heads_in(h)),
      ("layers", "attn", "out", "kernel"): block(attn + "o.weight", heads_out(h)),
      ("layers", "mlp_norm", "scale"): block("1.layer_norm.weight"),
      ("layers", "mlp", "wo", "kernel"): block("1.DenseReluDense.wo.weight", linear),
  }
  inputs = ("wi_0", "wi_1") if cfg.feed_forward == "gated-gelu" else ("wi",)
  for name in inputs:
    p[("layers", "mlp", name, "kernel")] = block(f"1.DenseReluDense.{name}.weight", linear)
  return p


def to_hf(cfg: Config, params) -> tuple[dict, dict]:
  """(config.json dict, state dict) of the tower as transformers' T5EncoderModel: the inverse of the plan
  (export; the tied embedding written once, as `shared.weight`)."""
  config = {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.num_buckets,
            "relative_attention_max_distance": cfg.max_distance, "layer_norm_epsilon": cfg.eps,
            "feed_forward_proj": cfg.feed_forward, "is_encoder_decoder": False, "use_cache": False}
  return config, io.to_state_dict(plan(cfg), strip_boxes(params))
