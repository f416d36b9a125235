"""The Stable Diffusion family (`model.family=unet`, options in `unet`): a conditioner's context (plain tokens, SD
style, by default in its configs; LI-DiT's refiners work too) read by cross-attention in diffusers' U-Net
(`models/unet.py`). The denoiser family contract is in `denoisers/__init__`.

The contract's time is in [0, 1]; the U-Net's embedder takes diffusers' timesteps, so it is scaled by
`ddpm.num_train_timesteps` (1000: SD's). FLOPs come from XLA's count of the lowered U-Net (one example, nothing
compiled): its convolutions are not worth a hand count.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax import conditioners
from lidit_jax.config_checks import fail, one_of
from lidit_jax.models import layers
from lidit_jax.models import unet as unet_lib

Dtype = Any


class SDUNet(nn.Module):
  """The U-Net reading a conditioner's context; `drop_B` swaps in the null context (CFG: conditioner.null). SDXL's
  added conditions: the conditioner's pooled vector (zero where dropped) and the size ids of an uncropped image
  of the input's size in pixels (`pixel_factor`: the autoencoder's), as diffusers' SDXL pipelines default them."""
  unet: unet_lib.UNetConfig
  conditioner: nn.Module
  time_scale: float = 1000.0
  dtype: Dtype = jnp.float32
  attention: str | None = None
  remat: str = "none"
  null: str = "learned"
  pixel_factor: int = 1
  second_mix: str = "per_layer"  # unet.second_attention

  @nn.compact
  def __call__(self, x_BHWC, t_B, feats, valids, prompts, drop_B=None):
    width = self.unet.cross_attention_dim
    # The conditioner's timestep embedding (LI-DiT's refiners read it; plain tokens ignore it and its weights)
    t_emb = layers.TimestepEmbedder(width, dtype=self.dtype, name="t_embedder")(t_B)
    out = conditioners.outputs(self.conditioner(feats, valids, prompts, t_emb))
    ctx, ctx_valid = conditioners.null_context(self, out.context, out.valid, drop_B, self.null)
    pooled, extra = out.pooled, {}
    if out.code is not None:  # a second context (the Diff Adapter's code): the U-Net's new cross-attentions
      code, code_valid = conditioners.null_context(self, out.code, out.code_valid, drop_B, self.null, "null_code")
      extra = dict(code_BMC=code, code_valid_BM=code_valid)
    if self.unet.addition_embed_type == "text_time":
      if pooled is None:
        raise ValueError("unet.addition_embed_type='text_time' (SDXL) needs a pooled text vector: a tower with "
                         "output='pooled' read by conditioner.kind='identity' (configs/sdxl.py)")
      if drop_B is not None:
        pooled = jnp.where(drop_B[:, None], 0, pooled)
      b, h, w, _ = x_BHWC.shape
      h, w = h * self.pixel_factor, w * self.pixel_factor
      extra.update(text_embeds=pooled, time_ids=jnp.tile(jnp.asarray([[h, w, 0, 0, h, w]], jnp.float32), (b, 1)))
    net = unet_lib.UNet2DConditionModel(self.unet, self.dtype, self.attention, self.remat, self.second_mix,
                                        name="denoiser")
    return net(x_BHWC, t_B * self.time_scale, ctx, ctx_valid, **extra)


def unet_config(config) -> unet_lib.UNetConfig:
  u = config.unet
  n = len(u.block_out_channels)
  per_block = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
  return unet_lib.UNetConfig(
      in_channels=config.autoencoder.channels, out_channels=config.autoencoder.channels,
      block_out_channels=tuple(u.block_out_channels), down_block_types=tuple(u.down_block_types),
      up_block_types=tuple(u.up_block_types), layers_per_block=u.layers_per_block,
      num_heads=per_block(u.num_heads), transformer_layers_per_block=per_block(u.transformer_layers_per_block),
      cross_attention_dim=u.cross_attention_dim, norm_num_groups=u.norm_num_groups,
      use_linear_projection=u.use_linear_projection, sample_size=config.data.image_size // config.autoencoder.factor,
      addition_embed_type=u.get("addition_embed_type") or None,
      addition_time_embed_dim=u.get("addition_time_embed_dim") or None,
      projection_class_embeddings_input_dim=u.get("projection_class_embeddings_input_dim") or None)


def build(config, attention: str) -> SDUNet:
  cfg = unet_config(config)
  cond = conditioners.conditioner(config).build(config, cfg.cross_attention_dim)
  return SDUNet(cfg, cond, float(config.ddpm.num_train_timesteps), jnp.dtype(config.model.dtype), attention,
                config.model.remat, config.conditioner.null, config.autoencoder.factor,
                config.unet.get("second_attention", "per_layer"))


def abstract_inputs(batch: int, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]]) -> dict:
  from lidit_jax.denoisers import lidit
  return lidit.abstract_inputs(batch, latent_hwc, text_shapes)  # the same call signature


def flops_per_example(config, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]]) -> dict:
  """{"unet": XLA's forward FLOPs of one example (the whole family module lowered, less the conditioner's),
  "conditioner": the conditioner's own count}."""
  module = build(config, "xla")
  inputs = abstract_inputs(1, latent_hwc, text_shapes)
  params = jax.eval_shape(lambda kw: module.init(jax.random.key(0), **kw), inputs)["params"]
  lowered = jax.jit(lambda p, kw: module.apply({"params": p}, **kw)).lower(params, inputs)
  cond = conditioners.conditioner(config).flops_per_example(config, text_shapes, module.unet.cross_attention_dim)
  return {"unet": float(lowered.cost_analysis()["flops"]) - cond, "conditioner": cond}


def activation_bytes(config, batch: int, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]],
                     tensor: int, itemsize: int) -> int:
  """Rough bytes kept for the backward pass, at each block's resolution. Without remat: per resnet about 6 feature
  maps, per transformer layer about 12 token maps plus the self- and cross-attention probabilities. Rematerialised,
  a resnet keeps its input (its convolutions are not dots: every policy recomputes them); a transformer keeps its
  input ("full"), or its dense layers' outputs (about 10 token maps: "dots_no_batch"), plus the probabilities
  ("dots")."""
  cfg = unet_config(config)
  remat = config.model.remat
  resnet_maps = 6 if remat == "none" else 1
  attn_maps = {"none": 12, "dots": 10, "dots_no_batch": 10, "full": 1}[remat]
  scores = remat in ("none", "dots")
  h, w, _ = latent_hwc
  s = sum(shape[0] for shape in text_shapes)
  total = 0
  for i, width in enumerate(cfg.block_out_channels):
    tokens = (h >> i) * (w >> i)
    resnets = 2 * cfg.layers_per_block + 1 + (2 if i == len(cfg.block_out_channels) - 1 else 0)  # down + up (+ mid)
    attn_layers = cfg.transformer_layers_per_block[i] * (
        ("CrossAttnDownBlock2D" == cfg.down_block_types[i]) * cfg.layers_per_block
        + ("CrossAttnUpBlock2D" == cfg.up_block_types[::-1][i]) * (cfg.layers_per_block + 1)
        + (i == len(cfg.block_out_channels) - 1))
    total += resnets * resnet_maps * tokens * width / tensor
    total += attn_layers * (attn_maps * tokens * width / tensor + scores * cfg.num_heads[i] / tensor * tokens * (tokens + s))
  return int(FLOAT32_NORMS * batch * total * itemsize)


# What the TPU compiler keeps over the count above in the model's dtype: group norms, softmax and the residual adds
# in float32 (SD 1.5 at 512 px, 4 examples per chip, no remat: 20.2 GiB compiled against 7.0 GiB counted;
# benchmarks/RESULTS.md, 2026-12-05).
FLOAT32_NORMS = 2.9


def param_groups(params) -> dict:
  rest = {k: v for k, v in params.items() if k not in ("denoiser", "conditioner")}
  return {"denoiser (U-Net)": params["denoiser"], "conditioner": params.get("conditioner", {}),  # identity: none
          "embeddings": rest}


def pretrained_weights(config, path: str) -> dict:
  """{"denoiser/...": array} of a converted diffusers U-Net (`python -m lidit_jax.convert diffusers` or
  `single-file`: OUT or OUT/unet) for `model.init`: the U-Net starts from it, the conditioner and the null context
  from their initialisation. Its layout must be the config's `unet` section (a mismatch is refused by field)."""
  import dataclasses
  import os
  from lidit_jax.cli import UserError
  from lidit_jax.convert import diffusers_unet
  if os.path.isfile(os.path.join(path, "model_index.json")):
    path = os.path.join(path, "unet")
  module, params = diffusers_unet.load_unet(path, jnp.dtype(config.model.dtype))
  want = unet_config(config)
  ignore = {"sample_size", "upcast_attention"}  # not in the weights' layout: the image size is data.image_size
  diff = {k: (v, getattr(want, k)) for k, v in dataclasses.asdict(module.cfg).items()
          if k not in ignore and v != getattr(want, k)}
  if diff:
    name, (theirs, ours) = next(iter(diff.items()))
    raise UserError(f"model.init={path!r}: its U-Net has {name}={theirs!r}, the config {ours!r} ({len(diff)} fields "
                    f"differ: {sorted(diff)}). Fix: set the config's unet section (and autoencoder.channels) to the "
                    "checkpoint's config.json")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"denoiser/" + "/".join(k.key for k in p): v for p, v in flat}


def validate(config, towers: Sequence[str]) -> None:
  """The `unet` section's checks, each a ConfigError naming value and fix."""
  try:
    cfg = unet_config(config)
  except ValueError as e:
    fail("unet.block_out_channels", tuple(config.unet.block_out_channels), str(e).split(". Fix")[0],
         "give every per-block field (block types, num_heads, transformer_layers_per_block) one entry per block")
  bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
  if bad:
    fail("unet.block_out_channels", cfg.block_out_channels, f"{bad} not divisible by unet.norm_num_groups="
         f"{cfg.norm_num_groups}", "use multiples of it")
  for width, heads in zip(cfg.block_out_channels, cfg.num_heads):
    if width % heads:
      fail("unet.num_heads", cfg.num_heads, f"{heads} heads do not divide a block width of {width}",
           "pick head counts that divide each block's width")
  one_of("unet.second_attention", config.unet.get("second_attention", "per_layer"), ("per_layer", "global"))
  unit = 2 ** (len(cfg.block_out_channels) - 1) * config.autoencoder.factor
  if config.data.image_size % unit:
    fail("data.image_size", config.data.image_size, f"the U-Net halves it {len(cfg.block_out_channels) - 1} times "
         f"(x autoencoder factor {config.autoencoder.factor})", f"use a multiple of {unit}")
