"""CLIP checkpoints -> `models.clip.CLIPTextTower` and `models.clip.CLIPVisionTower`.

Text: reads a CLIPTextModel save (keys un-prefixed in transformers 5, "text_model." in older ones such as
Stable Diffusion's text_encoder) or a full CLIPModel save ("text_model." prefix, config nested under
"text_config"); as a text family the vision tower and projections are skipped.
Image (`load_vision`, for CLIP score): a CLIPModel save ("vision_model." prefix, "vision_config", the
visual_projection at the root) or a CLIPVisionModel(WithProjection) save.
A CLIPModel's two projections map to its root `projection_dim`; the copies of that field inside its
text_config / vision_config are unused by transformers, and so here.
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.convert import registry, safetensors_io as io
from lidit_jax.convert.registry import token_abstract_params as abstract_params  # noqa: F401
from lidit_jax.convert.safetensors_io import heads_bias, heads_in, heads_out, linear, Source, with_inverse
from lidit_jax.models import clip

MODEL_TYPES = ("clip_text_model", "clip")
ANCHORS = ("embeddings.token_embedding.weight",)
# final_layer_norm is unused: no hidden state in the reference's convention has it applied.
IGNORED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale", "final_layer_norm.",
           "embeddings.position_ids")

Config = clip.CLIPTextConfig
VisionConfig = clip.CLIPVisionConfig
VISION_MODEL_TYPES = ("clip_vision_model", "clip")
VISION_ANCHORS = ("embeddings.patch_embedding.weight",)

# transformers' CLIPTextConfig defaults. A CLIPModel config.json stores in "text_config" only the values
# that differ from them, so they are needed to read one.
_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# transformers' CLIPVisionConfig defaults, and CLIPConfig's projection_dim
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_PROJECTION_DIM = 512


def _tower_config(hf: dict, side: str) -> dict:
  """A CLIPModel config's "text" or "vision" part; older configs carry overrides in "<side>_config_dict", which
  took precedence."""
  out = dict(hf.get(f"{side}_config") or {})
  out.update(hf.get(f"{side}_config_dict") or {})
  return out


def config_from_hf(hf: dict) -> Config:
  projection_dim = None
  if hf.get("model_type") == "clip":
    projection_dim = hf.get("projection_dim") or _PROJECTION_DIM
    hf = _tower_config(hf, "text")

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
                projection_dim=projection_dim or hf.get("projection_dim") or 0, eos_token_id=hf.get("eos_token_id", 2))


def vision_config_from_hf(hf: dict, where: str = "config.json") -> VisionConfig:
  """The image tower of a CLIPModel config, or of a CLIPVisionModel(WithProjection) one."""
  model_type = hf.get("model_type")
  if model_type not in VISION_MODEL_TYPES:
    raise ValueError(f"{where}: model_type={model_type!r} has no CLIP image tower; expected one of "
                     f"{list(VISION_MODEL_TYPES)}. Fix: point at a CLIP model folder (a CLIPModel save, e.g. "
                     "openai/clip-vit-large-patch14)")
  projection_dim = hf.get("projection_dim") or _PROJECTION_DIM
  if model_type == "clip":
    hf = _tower_config(hf, "vision")

  def get(key):
    value = hf.get(key)
    return _VISION_DEFAULTS[key] if value is None else value

  sizes = {}
  for key in ("image_size", "patch_size"):
    value = get(key)
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise ValueError(f"{where}: vision {key}={value} is not square; only square CLIP images are supported.")
      value = value[0]
    sizes[key] = int(value)
  act = get("hidden_act")
  if act not in clip.ACTIVATIONS:
    raise ValueError(f"{where}: vision hidden_act={act!r} is not supported for CLIP; "
                     f"supported: {list(clip.ACTIVATIONS)}.")
  return VisionConfig(hidden_size=get("hidden_size"), num_layers=get("num_hidden_layers"),
                      num_heads=get("num_attention_heads"), intermediate_size=get("intermediate_size"),
                      num_channels=get("num_channels"), hidden_act=act, eps=float(get("layer_norm_eps")),
                      projection_dim=projection_dim, **sizes)


def with_head(cfg: Config, projection: bool) -> Config:
  """The config that also reads the final LayerNorm and, with `projection`, the text projection (SD pipelines)."""
  return dataclasses.replace(cfg, head=True, projection_dim=cfg.projection_dim if projection else 0)


def sd_head(class_name: str):
  """The `adapt` of a Stable Diffusion pipeline's text encoder (model_index.json's class name): its head, and the
  projection of a CLIPTextModelWithProjection (SDXL's second encoder)."""
  return lambda cfg: with_head(cfg, class_name == "CLIPTextModelWithProjection")


def make_module(cfg: Config, dtype) -> nn.Module:
  return clip.CLIPTextTower(cfg, dtype)


def make_vision_module(cfg: VisionConfig, dtype) -> nn.Module:
  return clip.CLIPVisionTower(cfg, dtype)


def vision_abstract_params(module: nn.Module):
  c = module.cfg
  pixels = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), pixels)["params"]


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


def _encoder_plan(cfg: Config | VisionConfig) -> dict[tuple[str, ...], Source]:
  """The scanned blocks (`clip.CLIPBlock`, either tower's)."""
  h = cfg.num_heads

  def layer(suffix, *transform):  # one tensor per encoder layer, stacked on the scanned axis
    return Source.layers("encoder.layers.{}." + suffix, cfg.num_layers, *transform)

  p = {}
  for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
    p[("layers", ours, "scale")] = layer(f"{theirs}.weight")
    p[("layers", ours, "bias")] = layer(f"{theirs}.bias")
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    p[("layers", "attn", ours, "kernel")] = layer(f"self_attn.{theirs}.weight", heads_in(h))
    p[("layers", "attn", ours, "bias")] = layer(f"self_attn.{theirs}.bias", heads_bias(h))
  p[("layers", "attn", "out", "kernel")] = layer("self_attn.out_proj.weight", heads_out(h))
  p[("layers", "attn", "out", "bias")] = layer("self_attn.out_proj.bias")
  for fc in ("fc1", "fc2"):
    p[("layers", fc, "kernel")] = layer(f"mlp.{fc}.weight", linear)
    p[("layers", fc, "bias")] = layer(f"mlp.{fc}.bias")
  return p


def plan(cfg: Config) -> dict[tuple[str, ...], Source]:
  p = {
      ("token_embedding",): Source.one("embeddings.token_embedding.weight"),
      ("position_embedding",): Source.one("embeddings.position_embedding.weight"),
      **_encoder_plan(cfg),
  }
  if cfg.head:
    p[("final_layer_norm", "scale")] = Source.one("final_layer_norm.weight")
    p[("final_layer_norm", "bias")] = Source.one("final_layer_norm.bias")
  if cfg.head and cfg.projection_dim:  # at the root of CLIPTextModelWithProjection, outside text_model.
    p[("text_projection", "kernel")] = Source.one("text_projection.weight", linear)
  return p


def _patch_kernel(cfg: VisionConfig):
  """conv weight [D, C, p, p] <-> our patch Dense kernel [p p C, D], patches flattened (row, column, channel)."""
  p, c = cfg.patch_size, cfg.num_channels
  return with_inverse(lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, -1),
                      lambda k: k.reshape(p, p, c, -1).transpose(3, 2, 0, 1))


def vision_plan(cfg: VisionConfig) -> dict[tuple[str, ...], Source]:
  """Keys under "vision_model." (the prefix `load_vision` finds), the projection at the root."""
  p = {
      ("patch_embedding", "kernel"): Source.one("embeddings.patch_embedding.weight", _patch_kernel(cfg)),
      ("class_embedding",): Source.one("embeddings.class_embedding"),
      ("position_embedding",): Source.one("embeddings.position_embedding.weight"),
      ("pre_layernorm", "scale"): Source.one("pre_layrnorm.weight"),  # (sic: transformers' name)
      ("pre_layernorm", "bias"): Source.one("pre_layrnorm.bias"),
      **_encoder_plan(cfg),
      ("post_layernorm", "scale"): Source.one("post_layernorm.weight"),
      ("post_layernorm", "bias"): Source.one("post_layernorm.bias"),
  }
  if cfg.projection_dim:
    p[("visual_projection", "kernel")] = Source.one("visual_projection.weight", linear)
  return p


def load_vision(path: str, dtype=jnp.float32) -> tuple[nn.Module, dict]:
  """(module, params) of the image tower of a Hugging Face CLIP folder (config.json + safetensors), projection
  included where the folder has one (a CLIPVisionModel save has none)."""
  path = os.path.expanduser(os.fspath(path))
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config):
    raise FileNotFoundError(f"{path} has no config.json. Fix: point at a Hugging Face CLIP model folder "
                            "(config.json with a vision_config, model.safetensors)")
  cfg = vision_config_from_hf(io.read_json(config), config)
  files = io.CheckpointFiles(path)
  files.find_prefix(VISION_ANCHORS)
  if cfg.projection_dim and files.resolve("visual_projection.weight") is None:
    cfg = dataclasses.replace(cfg, projection_dim=0)  # CLIPVisionModel: the pooled state is the embedding
  module = make_vision_module(cfg, dtype)
  expected = io.flatten_shapes(io.strip_boxes(vision_abstract_params(module)))
  return module, io.build_params(vision_plan(cfg), files, expected, dtype)


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
