"""diffusers `PixArtTransformer2DModel` folders (PixArt-alpha / Sigma) -> `models.pixart.PixArtTransformer`.

The blocks are scanned here (one stacked array per parameter); the patch embedding's conv is a Dense over
(row, column, channel) patches; q / k / v / out are HeadsDense kernels. Config fields the module does not
implement are refused by name. `to_diffusers` is the inverse (export), bit for bit.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.convert import orbax_io, registry, safetensors_io as io
from lidit_jax.convert.safetensors_io import Source, heads_bias, heads_in, heads_out, linear
from lidit_jax.models import pixart

Config = pixart.PixArtConfig
CLASS = "PixArtTransformer2DModel"
# (config field, the value our module implements): anything else is refused
_FIXED = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
          "norm_elementwise_affine": False, "norm_eps": 1e-6, "upcast_attention": False, "attention_type": "default",
          "dropout": 0.0}


def config_from_diffusers(d: dict, where: str = "config.json") -> Config:
  if d.get("_class_name", CLASS) != CLASS:
    raise ValueError(f"{where}: _class_name {d.get('_class_name')!r} is not a {CLASS}. Fix: point at a PixArt "
                     "transformer folder (a pipeline's transformer/)")
  for key, value in _FIXED.items():
    if key in d and d[key] is not None and d[key] != value:
      raise ValueError(f"{where}: {key}={d[key]!r} is not supported (only {value!r}). Fix: use a PixArt-alpha / "
                       "Sigma transformer, or extend models/pixart.py")
  base = Config()
  get = lambda k, default=None: d[k] if d.get(k) is not None else (default if default is not None else getattr(base, k))
  heads, head_dim = int(get("num_attention_heads", 16)), int(get("attention_head_dim", 72))
  width = heads * head_dim
  cross = d.get("cross_attention_dim")
  if cross is not None and cross != width:
    raise ValueError(f"{where}: cross_attention_dim={cross} differs from the width {heads} x {head_dim} = {width}. "
                     "Fix: PixArt's cross-attention reads the projected caption at the model's width")
  sample = int(get("sample_size", 128))
  additional = d.get("use_additional_conditions")
  if additional is None:  # diffusers' rule: the 1024 px models (latent side 128) take micro-conditions
    additional = sample == 128
  if additional and width % 3:
    raise ValueError(f"{where}: use_additional_conditions needs a width divisible by 3, not {width}")
  in_channels = int(get("in_channels", 4))
  return Config(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
                out_channels=int(d["out_channels"]) if d.get("out_channels") is not None else in_channels,
                num_layers=int(get("num_layers", 28)), caption_channels=int(d.get("caption_channels") or 0),
                sample_size=sample, patch_size=int(get("patch_size", 2)),
                interpolation_scale=float(d["interpolation_scale"]) if d.get("interpolation_scale") is not None
                else float(max(sample // 64, 1)), use_additional_conditions=bool(additional))


def make_module(cfg: Config, dtype, attention: str = "xla", remat: str = "none") -> pixart.PixArtTransformer:
  return pixart.PixArtTransformer(cfg, dtype, attention, remat)


def abstract_params(module: pixart.PixArtTransformer):
  return jax.eval_shape(lambda args: module.init(jax.random.key(0), *args, (8, 8), method=pixart.forward),
                        pixart.abstract_inputs(module.cfg))["params"]


def _patch(p: int, channels: int):
  """Conv [width, C, p, p] <-> Dense kernel [(p_row, p_col, C), width]."""
  return io.with_inverse(lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * channels, -1),
                         lambda k: k.reshape(p, p, channels, -1).transpose(3, 2, 0, 1))


def plan(cfg: Config, expected=None) -> dict[tuple[str, ...], Source]:
  """{our parameter path: Source} in diffusers' naming (from the config alone: `expected` is not read)."""
  h, n = cfg.num_attention_heads, cfg.num_layers
  block = lambda suffix, *t: Source.layers("transformer_blocks.{}." + suffix, n, *t)
  one = Source.one
  p = {("dit", "patch_embed", "kernel"): one("pos_embed.proj.weight", _patch(cfg.patch_size, cfg.in_channels)),
       ("dit", "patch_embed", "bias"): one("pos_embed.proj.bias"),
       ("dit", "shared_modulation", "kernel"): one("adaln_single.linear.weight", linear),
       ("dit", "shared_modulation", "bias"): one("adaln_single.linear.bias"),
       ("dit", "final_scale_shift_table"): one("scale_shift_table"),
       ("dit", "final_proj", "kernel"): one("proj_out.weight", linear),
       ("dit", "final_proj", "bias"): one("proj_out.bias"),
       ("dit", "blocks", "block", "scale_shift_table"): block("scale_shift_table"),
       ("dit", "blocks", "block", "mlp", "fc1", "kernel"): block("ff.net.0.proj.weight", linear),
       ("dit", "blocks", "block", "mlp", "fc1", "bias"): block("ff.net.0.proj.bias"),
       ("dit", "blocks", "block", "mlp", "fc2", "kernel"): block("ff.net.2.weight", linear),
       ("dit", "blocks", "block", "mlp", "fc2", "bias"): block("ff.net.2.bias")}
  for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    for proj, key in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
      p[("dit", "blocks", "block", ours, proj, "kernel")] = block(f"{theirs}.{key}.weight", heads_in(h))
      p[("dit", "blocks", "block", ours, proj, "bias")] = block(f"{theirs}.{key}.bias", heads_bias(h))
    p[("dit", "blocks", "block", ours, "out", "kernel")] = block(f"{theirs}.to_out.0.weight", heads_out(h))
    p[("dit", "blocks", "block", ours, "out", "bias")] = block(f"{theirs}.to_out.0.bias")
  embedders = [("t_embedder", "timestep_embedder")]
  if cfg.use_additional_conditions:
    embedders += [("resolution_embedder", "resolution_embedder"), ("aspect_ratio_embedder", "aspect_ratio_embedder")]
  for ours, theirs in embedders:
    for fc, lin in (("fc1", "linear_1"), ("fc2", "linear_2")):
      p[(ours, fc, "kernel")] = one(f"adaln_single.emb.{theirs}.{lin}.weight", linear)
      p[(ours, fc, "bias")] = one(f"adaln_single.emb.{theirs}.{lin}.bias")
  if cfg.caption_channels:
    for fc, lin in (("caption_fc1", "linear_1"), ("caption_fc2", "linear_2")):
      p[(fc, "kernel")] = one(f"caption_projection.{lin}.weight", linear)
      p[(fc, "bias")] = one(f"caption_projection.{lin}.bias")
  return p


class Conversion(io.Conversion):
  """A PixArt transformer folder (or a pipeline's transformer/): `prepare(path, dtype)` checks it
  against our module, `run` streams its parameters."""
  SUBFOLDER, CLASS, WHAT = "transformer", CLASS, "transformer"


def read_config(where: str) -> Config:
  return io.read_component_config(where, CLASS, config_from_diffusers)


def load(path: str, dtype=jnp.float32):
  """(module, params) from a diffusers transformer or pipeline folder, or our converted directory."""
  return orbax_io.load_or_convert(path, "diffusers_pixart", "PixArt transformer", Conversion, dtype)


def to_diffusers(cfg: Config, params) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, state dict) in diffusers' naming and layouts: the inverse of the plan (export)."""
  config = {"_class_name": CLASS, "num_attention_heads": cfg.num_attention_heads,
            "attention_head_dim": cfg.attention_head_dim, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "num_layers": cfg.num_layers, "cross_attention_dim": cfg.width,
            "caption_channels": cfg.caption_channels or None, "sample_size": cfg.sample_size,
            "patch_size": cfg.patch_size, "interpolation_scale": cfg.interpolation_scale,
            "use_additional_conditions": cfg.use_additional_conditions, "num_embeds_ada_norm": 1000, **_FIXED}
  params = registry.strip_boxes(params)
  return config, io.to_state_dict(plan(cfg), params)
