"""CLIP text encoder checkpoints -> `models.clip.CLIPTextTower`.

Reads a CLIPTextModel save (keys un-prefixed in transformers 5, "text_model." in older ones such as
Stable Diffusion's text_encoder) or a full CLIPModel save ("text_model." prefix, config nested under
"text_config"); the vision tower and projections are skipped.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn

from lidit_jax.convert import registry, safetensors_io as io
from lidit_jax.convert.registry import token_abstract_params as abstract_params  # noqa: F401
from lidit_jax.convert.safetensors_io import heads_bias, heads_in, heads_out, linear, Source
from lidit_jax.models import clip

MODEL_TYPES = ("clip_text_model", "clip")
ANCHORS = ("embeddings.token_embedding.weight",)
# final_layer_norm is unused: no hidden state in the reference's convention has it applied.
IGNORED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale", "final_layer_norm.",
           "embeddings.position_ids")

Config = clip.CLIPTextConfig

# transformers' CLIPTextConfig defaults. A CLIPModel config.json stores in "text_config" only the values
# that differ from them, so they are needed to read one.
_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def config_from_hf(hf: dict) -> Config:
  if hf.get("model_type") == "clip":
    # Older CLIPModel configs carry overrides in "text_config_dict", which took precedence.
    text = dict(hf.get("text_config") or {})
    text.update(hf.get("text_config_dict") or {})
    hf = text

  def get(key):
    value = hf.get(key)
    return _DEFAULTS[key] if value is None else value

  act = get("hidden_act")
  if act not in clip.ACTIVATIONS:
    raise ValueError(f"config.json: hidden_act={act!r} is not supported for CLIP text; "
                     f"supported: {list(clip.ACTIVATIONS)}.")
  pos = hf.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise ValueError(f"config.json: position_embedding_type={pos!r} is not supported for CLIP text; "
                     "supported: ['absolute'] (learned positions 0..L-1).")
  return Config(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_layers=get("num_hidden_layers"),
                num_heads=get("num_attention_heads"), intermediate_size=get("intermediate_size"),
                max_positions=get("max_position_embeddings"), hidden_act=act, eps=float(get("layer_norm_eps")),
                projection_dim=hf.get("projection_dim") or 0, eos_token_id=hf.get("eos_token_id", 2))


def with_head(cfg: Config, projection: bool) -> Config:
  """The config that also reads the final LayerNorm and, with `projection`, the text projection (SD pipelines)."""
  return dataclasses.replace(cfg, head=True, projection_dim=cfg.projection_dim if projection else 0)


def sd_head(class_name: str):
  """The `adapt` of a Stable Diffusion pipeline's text encoder (model_index.json's class name): its head, and the
  projection of a CLIPTextModelWithProjection (SDXL's second encoder)."""
  return lambda cfg: with_head(cfg, class_name == "CLIPTextModelWithProjection")


def make_module(cfg: Config, dtype) -> nn.Module:
  return clip.CLIPTextTower(cfg, dtype)


# As a frozen text tower (`model.TextTower`): hidden states (optionally through the final LayerNorm: SD 1.x /
# 2.x's last_hidden_state, diffusers' clip_skip), or the projected pooled output (SDXL's text_embeds).
READINGS = ("hidden", "pooled", "final_norm")


def tower_module(cfg: Config, dtype, tc) -> tuple[nn.Module, int]:
  pooled = tc.output == "pooled"
  if (tc.final_norm or pooled) and (not cfg.head or (pooled and not cfg.projection_dim)):
    cfg = with_head(cfg, projection=pooled)  # a Hugging Face CLIP folder: read its head too
  return make_module(cfg, dtype), cfg.projection_dim if pooled else cfg.hidden_size


def tower_output(module, params, out, tower):
  """`out`: every hidden state stacked, or with the head (every state, last, pooled)."""
  if tower.pooled:
    return out[2][:, None, :]
  states = out[0] if isinstance(out, tuple) else out
  hidden = states if tower.all_layers else states[tower.layer]
  return clip.final_norm(module.cfg, params, hidden) if tower.final_norm else hidden


def plan(cfg: Config) -> dict[tuple[str, ...], Source]:
  h = cfg.num_heads

  def layer(suffix, *transform):  # one tensor per encoder layer, stacked on the scanned axis
    return Source.layers("encoder.layers.{}." + suffix, cfg.num_layers, *transform)

  p = {
      ("token_embedding",): Source.one("embeddings.token_embedding.weight"),
      ("position_embedding",): Source.one("embeddings.position_embedding.weight"),
  }
  for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
    p[("layers", ours, "scale")] = layer(f"{theirs}.weight")
    p[("layers", ours, "bias")] = layer(f"{theirs}.bias")
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    p[("layers", "attn", ours, "kernel")] = layer(f"self_attn.{theirs}.weight", heads_in(h))
    p[("layers", "attn", ours, "bias")] = layer(f"self_attn.{theirs}.bias", heads_bias(h))
  p[("layers", "attn", "out", "kernel")] = layer("self_attn.out_proj.weight", heads_out(h))
  p[("layers", "attn", "out", "bias")] = layer("self_attn.out_proj.bias")
  if cfg.head:
    p[("final_layer_norm", "scale")] = Source.one("final_layer_norm.weight")
    p[("final_layer_norm", "bias")] = Source.one("final_layer_norm.bias")
  if cfg.head and cfg.projection_dim:  # at the root of CLIPTextModelWithProjection, outside text_model.
    p[("text_projection", "kernel")] = Source.one("text_projection.weight", linear)
  for fc in ("fc1", "fc2"):
    p[("layers", fc, "kernel")] = layer(f"mlp.{fc}.weight", linear)
    p[("layers", fc, "bias")] = layer(f"mlp.{fc}.bias")
  return p


def to_hf(cfg: Config, params) -> tuple[dict, dict]:
  """(config.json dict, state dict) of the tower as transformers' CLIPTextModel, or CLIPTextModelWithProjection
  when it has a projection: the inverse of the plan (export). Keys as Stable Diffusion's hub folders hold them
  ("text_model."; transformers 4 and 5 both load them)."""
  if not cfg.head:
    raise ValueError("a CLIP tower without its head (final LayerNorm) cannot be exported as a CLIPTextModel")
  projection = bool(cfg.projection_dim)
  config = {"architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "max_position_embeddings": cfg.max_positions,
            "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.eps, "eos_token_id": cfg.eos_token_id,
            **({"projection_dim": cfg.projection_dim} if projection else {})}
  state = io.to_state_dict(plan(cfg), registry.strip_boxes(params))
  return config, {k if k.startswith("text_projection") else "text_model." + k: v for k, v in state.items()}
