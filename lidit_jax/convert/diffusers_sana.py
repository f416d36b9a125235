"""diffusers `SanaTransformer2DModel` folders (Sana 0.6 B / 1.6 B) -> `models.sana.SanaTransformer`.

The blocks are scanned here (one stacked array per parameter); the patch embedding's conv is a Dense over
(row, column, channel) patches; q / k / v / out are HeadsDense kernels; the GLU MBConv's convs keep their shapes
(OIHW -> HWIO). Config values the module does not implement (Sana-Sprint's guidance embedding, Sana 1.5's QK norm)
are refused by name. `to_diffusers` is the inverse (export), bit for bit.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.convert import orbax_io, registry, safetensors_io as io
from lidit_jax.convert.diffusers_pixart import _patch
from lidit_jax.convert.safetensors_io import Source, heads_bias, heads_in, heads_out, linear
from lidit_jax.models import sana

Config = sana.SanaConfig
CLASS = "SanaTransformer2DModel"
# (config field, the value our module implements): anything else is refused
_FIXED = {"guidance_embeds": False, "qk_norm": None, "norm_elementwise_affine": False, "norm_eps": 1e-6,
          "dropout": 0.0, "timestep_scale": 1.0}  # the family scales the contract's time by sana.time_scale alone
_conv = io.with_inverse(lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


def config_from_diffusers(d: dict, where: str = "config.json") -> Config:
  if d.get("_class_name", CLASS) != CLASS:
    raise ValueError(f"{where}: _class_name {d.get('_class_name')!r} is not a {CLASS}. Fix: point at a Sana "
                     "transformer folder (a pipeline's transformer/)")
  for key, value in _FIXED.items():
    if d.get(key) is not None and d[key] != value:
      raise ValueError(f"{where}: {key}={d[key]!r} is not supported (only {value!r}). Fix: use a Sana 1.0 "
                       "transformer, or extend models/sana.py")
  base = Config()
  get = lambda k: d[k] if d.get(k) is not None else getattr(base, k)
  cfg = Config(in_channels=int(get("in_channels")), out_channels=int(d.get("out_channels") or get("in_channels")),
               num_attention_heads=int(get("num_attention_heads")), attention_head_dim=int(get("attention_head_dim")),
               num_layers=int(get("num_layers")), num_cross_attention_heads=int(get("num_cross_attention_heads")),
               cross_attention_head_dim=int(get("cross_attention_head_dim")),
               caption_channels=int(get("caption_channels")), mlp_ratio=float(get("mlp_ratio")),
               attention_bias=bool(d.get("attention_bias", False)), sample_size=int(get("sample_size")),
               patch_size=int(get("patch_size")), interpolation_scale=float(d.get("interpolation_scale") or 0.0))
  if d.get("cross_attention_dim") not in (None, cfg.width):
    raise ValueError(f"{where}: cross_attention_dim={d['cross_attention_dim']} differs from the width {cfg.width}. "
                     "Fix: Sana's cross-attention reads the projected caption at the model's width")
  return cfg


def make_module(cfg: Config, dtype, attention: str = "xla", remat: str = "none") -> sana.SanaTransformer:
  return sana.SanaTransformer(cfg, dtype, attention, remat)


def abstract_params(module: sana.SanaTransformer):
  return jax.eval_shape(lambda args: module.init(jax.random.key(0), *args, method=sana.forward),
                        sana.abstract_inputs(module.cfg))["params"]


def plan(cfg: Config, expected=None) -> dict[tuple[str, ...], Source]:
  """{our parameter path: Source} in diffusers' naming (from the config alone: `expected` is not read)."""
  n, h, hc = cfg.num_layers, cfg.num_attention_heads, cfg.num_cross_attention_heads
  block = lambda suffix, *t: Source.layers("transformer_blocks.{}." + suffix, n, *t)
  one = Source.one
  b = ("blocks",)
  p = {("patch_embed", "kernel"): one("patch_embed.proj.weight", _patch(cfg.patch_size, cfg.in_channels)),
       ("patch_embed", "bias"): one("patch_embed.proj.bias"),
       ("shared_modulation", "kernel"): one("time_embed.linear.weight", linear),
       ("shared_modulation", "bias"): one("time_embed.linear.bias"),
       ("caption_norm", "scale"): one("caption_norm.weight"),
       ("final_scale_shift_table",): one("scale_shift_table"),
       ("final_proj", "kernel"): one("proj_out.weight", linear), ("final_proj", "bias"): one("proj_out.bias"),
       b + ("scale_shift_table",): block("scale_shift_table"),
       b + ("out", "kernel"): block("attn1.to_out.0.weight", heads_out(h)),
       b + ("out", "bias"): block("attn1.to_out.0.bias")}
  for ours, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
    p[b + (ours, "kernel")] = block(f"attn1.{theirs}.weight", heads_in(h))
    if cfg.attention_bias:
      p[b + (ours, "bias")] = block(f"attn1.{theirs}.bias", heads_bias(h))
    p[b + ("cross_attn", ours, "kernel")] = block(f"attn2.{theirs}.weight", heads_in(hc))
    p[b + ("cross_attn", ours, "bias")] = block(f"attn2.{theirs}.bias", heads_bias(hc))
  p[b + ("cross_attn", "out", "kernel")] = block("attn2.to_out.0.weight", heads_out(hc))
  p[b + ("cross_attn", "out", "bias")] = block("attn2.to_out.0.bias")
  for conv, bias in (("conv_inverted", True), ("conv_depth", True), ("conv_point", False)):
    p[b + ("ff", conv, "kernel")] = block(f"ff.{conv}.weight", _conv)
    if bias:
      p[b + ("ff", conv, "bias")] = block(f"ff.{conv}.bias")
  for fc, lin in (("fc1", "linear_1"), ("fc2", "linear_2")):
    p[("t_embedder", fc, "kernel")] = one(f"time_embed.emb.timestep_embedder.{lin}.weight", linear)
    p[("t_embedder", fc, "bias")] = one(f"time_embed.emb.timestep_embedder.{lin}.bias")
    p[(f"caption_{fc}", "kernel")] = one(f"caption_projection.{lin}.weight", linear)
    p[(f"caption_{fc}", "bias")] = one(f"caption_projection.{lin}.bias")
  return p


class Conversion(io.Conversion):
  """A Sana transformer folder (or a pipeline's transformer/): `prepare(path, dtype)` checks it
  against our module, `run` streams its parameters."""
  SUBFOLDER, CLASS, WHAT = "transformer", CLASS, "transformer"


def load(path: str, dtype=jnp.float32):
  """(module, params) from a diffusers Sana transformer or pipeline folder, or our converted directory."""
  return orbax_io.load_or_convert(path, "diffusers_sana", "Sana transformer", Conversion, dtype)


def to_diffusers(cfg: Config, params) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, state dict) in diffusers' naming and layouts: the inverse of the plan (export)."""
  config = {"_class_name": CLASS, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "num_attention_heads": cfg.num_attention_heads, "attention_head_dim": cfg.attention_head_dim,
            "num_layers": cfg.num_layers, "num_cross_attention_heads": cfg.num_cross_attention_heads,
            "cross_attention_head_dim": cfg.cross_attention_head_dim, "cross_attention_dim": cfg.width,
            "caption_channels": cfg.caption_channels, "mlp_ratio": cfg.mlp_ratio,
            "attention_bias": cfg.attention_bias,
            "sample_size": cfg.sample_size, "patch_size": cfg.patch_size,
            "interpolation_scale": cfg.interpolation_scale or None, **_FIXED}
  params = registry.strip_boxes(params)
  return config, io.to_state_dict(plan(cfg), params)
