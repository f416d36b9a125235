"""diffusers `Lumina2Transformer2DModel` folders (Lumina-Image 2.0) -> `models.lumina2.Lumina2Transformer`.

The main layers are scanned here (one stacked array per parameter), the refiners are not; q / k / v / out are
HeadsDense kernels (GQA: k and v with their own head count), the SwiGLU's linear_1 / linear_3 / linear_2 are its
gate / up / down. `to_diffusers` is the inverse (export), bit for bit.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.convert import orbax_io, registry, safetensors_io as io
from lidit_jax.convert.safetensors_io import Source, heads_in, heads_out, linear
from lidit_jax.models import lumina2

Config = lumina2.Lumina2Config
CLASS = "Lumina2Transformer2DModel"


def config_from_diffusers(d: dict, where: str = "config.json") -> Config:
  if d.get("_class_name", CLASS) != CLASS:
    raise ValueError(f"{where}: _class_name {d.get('_class_name')!r} is not a {CLASS}. Fix: point at a Lumina 2 "
                     "transformer folder (a pipeline's transformer/)")
  base = Config()
  get = lambda k: d[k] if d.get(k) is not None else getattr(base, k)
  cfg = Config(sample_size=int(get("sample_size")), patch_size=int(get("patch_size")),
               in_channels=int(get("in_channels")), out_channels=int(d.get("out_channels") or get("in_channels")),
               hidden_size=int(get("hidden_size")), num_layers=int(get("num_layers")),
               num_refiner_layers=int(get("num_refiner_layers")), num_attention_heads=int(get("num_attention_heads")),
               num_kv_heads=int(get("num_kv_heads")), multiple_of=int(get("multiple_of")),
               ffn_dim_multiplier=float(d.get("ffn_dim_multiplier") or 0.0), norm_eps=float(get("norm_eps")),
               axes_dim_rope=tuple(get("axes_dim_rope")), axes_lens=tuple(get("axes_lens")),
               cap_feat_dim=int(get("cap_feat_dim")))
  if sum(cfg.axes_dim_rope) != cfg.head_dim:
    raise ValueError(f"{where}: axes_dim_rope={list(cfg.axes_dim_rope)} must sum to the head dim {cfg.head_dim}")
  return cfg


def make_module(cfg: Config, dtype, attention: str = "xla", remat: str = "none") -> lumina2.Lumina2Transformer:
  return lumina2.Lumina2Transformer(cfg, dtype, attention, remat)


def abstract_params(module: lumina2.Lumina2Transformer):
  return jax.eval_shape(lambda args: module.init(jax.random.key(0), *args, method=lumina2.forward),
                        lumina2.abstract_inputs(module.cfg))["params"]


def _block(cfg: Config, ours: tuple, theirs, modulation: bool) -> dict:
  """One block's plan: `theirs(suffix)` -> the Source of the block's tensor `suffix`."""
  h, kv = cfg.num_attention_heads, cfg.num_kv_heads
  p = {ours + ("query", "kernel"): theirs("attn.to_q.weight", heads_in(h)),
       ours + ("key", "kernel"): theirs("attn.to_k.weight", heads_in(kv)),
       ours + ("value", "kernel"): theirs("attn.to_v.weight", heads_in(kv)),
       ours + ("out", "kernel"): theirs("attn.to_out.0.weight", heads_out(h)),
       ours + ("q_norm", "scale"): theirs("attn.norm_q.weight"), ours + ("k_norm", "scale"): theirs("attn.norm_k.weight"),
       ours + ("norm1", "scale"): theirs("norm1.norm.weight" if modulation else "norm1.weight"),
       ours + ("feed_forward", "gate_proj", "kernel"): theirs("feed_forward.linear_1.weight", linear),
       ours + ("feed_forward", "up_proj", "kernel"): theirs("feed_forward.linear_3.weight", linear),
       ours + ("feed_forward", "down_proj", "kernel"): theirs("feed_forward.linear_2.weight", linear)}
  for norm in ("norm2", "ffn_norm1", "ffn_norm2"):
    p[ours + (norm, "scale")] = theirs(f"{norm}.weight")
  if modulation:
    p[ours + ("norm1_linear", "kernel")] = theirs("norm1.linear.weight", linear)
    p[ours + ("norm1_linear", "bias")] = theirs("norm1.linear.bias")
  return p


def plan(cfg: Config, expected=None) -> dict[tuple[str, ...], Source]:
  """{our parameter path: Source} in diffusers' naming (from the config alone: `expected` is not read)."""
  one = Source.one
  p = {("x_embedder", "kernel"): one("x_embedder.weight", linear), ("x_embedder", "bias"): one("x_embedder.bias"),
       ("caption_norm", "scale"): one("time_caption_embed.caption_embedder.0.weight"),
       ("caption_proj", "kernel"): one("time_caption_embed.caption_embedder.1.weight", linear),
       ("caption_proj", "bias"): one("time_caption_embed.caption_embedder.1.bias"),
       ("norm_out_linear", "kernel"): one("norm_out.linear_1.weight", linear),
       ("norm_out_linear", "bias"): one("norm_out.linear_1.bias"),
       ("final_proj", "kernel"): one("norm_out.linear_2.weight", linear), ("final_proj", "bias"): one("norm_out.linear_2.bias")}
  for fc, lin in (("fc1", "linear_1"), ("fc2", "linear_2")):
    p[("t_embedder", fc, "kernel")] = one(f"time_caption_embed.timestep_embedder.{lin}.weight", linear)
    p[("t_embedder", fc, "bias")] = one(f"time_caption_embed.timestep_embedder.{lin}.bias")
  for name, modulation in (("context_refiner", False), ("noise_refiner", True)):
    for i in range(cfg.num_refiner_layers):
      p.update(_block(cfg, (f"{name}_{i}",), lambda s, *t, pre=f"{name}.{i}.": one(pre + s, *t), modulation))
  p.update(_block(cfg, ("layers", "block"), lambda s, *t: Source.layers("layers.{}." + s, cfg.num_layers, *t), True))
  return p


class Conversion(io.Conversion):
  """A Lumina 2 transformer folder (or a pipeline's transformer/): `prepare(path, dtype)` checks it
  against our module, `run` streams its parameters."""
  SUBFOLDER, CLASS, WHAT = "transformer", CLASS, "transformer"


def load(path: str, dtype=jnp.float32):
  """(module, params) from a diffusers Lumina 2 transformer or pipeline folder, or our converted directory."""
  return orbax_io.load_or_convert(path, "diffusers_lumina2", "Lumina 2 transformer", Conversion, dtype)


def to_diffusers(cfg: Config, params) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, state dict) in diffusers' naming and layouts: the inverse of the plan (export)."""
  config = {"_class_name": CLASS, "sample_size": cfg.sample_size, "patch_size": cfg.patch_size,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers, "num_refiner_layers": cfg.num_refiner_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_kv_heads,
            "multiple_of": cfg.multiple_of, "ffn_dim_multiplier": cfg.ffn_dim_multiplier or None,
            "norm_eps": cfg.norm_eps, "axes_dim_rope": list(cfg.axes_dim_rope), "axes_lens": list(cfg.axes_lens),
            "cap_feat_dim": cfg.cap_feat_dim}
  params = registry.strip_boxes(params)
  return config, io.to_state_dict(plan(cfg), params)
