"""diffusers' `UNet2DConditionModel` in Flax Linen, NHWC: the denoiser of SD 1.x, SD 2.x and SDXL.

Blocks as diffusers builds them (CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D /
UpBlock2D; ResnetBlock2D with the time embedding added after the first conv; Transformer2DModel with GroupNorm
eps 1e-6, 1x1-conv or linear projections, BasicTransformerBlocks of self-attention, cross-attention and a GEGLU
feed-forward), and submodule names that follow its state-dict keys (`down_blocks_0/attentions_1/
transformer_blocks_0/attn2/to_k` is `down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`), so conversion
is a rename plus layout changes. SDXL's `addition_embed_type="text_time"` adds the pooled text embedding and the
six size / crop time ids to the time embedding. Attention goes through `layers.attend` (XLA, cuDNN, splash) with
the text padding mask. The module takes diffusers' timesteps (0 .. num_train_timesteps).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from lidit_jax.models import layers
from lidit_jax.models.vae import conv, group_norm

Dtype = layers.Dtype
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """diffusers' UNet2DConditionModel config.json fields (defaults: SD 1.x); per-block fields as tuples."""
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  layers_per_block: int = 2
  num_heads: tuple[int, ...] = (8, 8, 8, 8)  # diffusers' attention_head_dim (legacy name) or num_attention_heads
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False  # softmax in float32 (ours always is: jax.nn.dot_product_attention)
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  addition_embed_type: str | None = None  # "text_time" (SDXL)
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  sample_size: int = 64

  def __post_init__(self):
    n = len(self.block_out_channels)
    for key in ("down_block_types", "up_block_types", "num_heads", "transformer_layers_per_block"):
      if len(getattr(self, key)) != n:
        raise ValueError(f"UNet {key} {getattr(self, key)} has {len(getattr(self, key))} entries for "
                         f"{n} blocks. Fix: one per entry of block_out_channels")
    bad = [t for t in self.down_block_types if t not in DOWN_BLOCKS] + [t for t in self.up_block_types if t not in UP_BLOCKS]
    if bad:
      raise ValueError(f"UNet block types {bad} are not supported. Fix: use {DOWN_BLOCKS} / {UP_BLOCKS}")

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]


def timestep_embedding(t_B, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
  """diffusers' get_timestep_embedding: [sin | cos] of t * exp(-ln(max_period) i / (half - freq_shift))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = t_B.astype(jnp.float32)[:, None] * freqs[None]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.Dense(self.features, ("cond", "mlp"), dtype=self.dtype, name="linear_1")(x)
    return layers.Dense(self.features, ("mlp", "embed"), dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock(nn.Module):
  """ResnetBlock2D: GroupNorm -> SiLU -> conv, + the projected time embedding, GroupNorm -> SiLU -> conv, + input."""
  features: int
  groups: int
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, temb_BD):
    h = conv(self.features, dtype=self.dtype, name="conv1")(
        nn.silu(group_norm(self.groups, self.dtype, "norm1", self.eps)(x_BHWC)))
    t = layers.Dense(self.features, ("embed", "conv_out"), dtype=self.dtype, name="time_emb_proj")(nn.silu(temb_BD))
    h = h + t[:, None, None, :].astype(h.dtype)
    h = conv(self.features, dtype=self.dtype, name="conv2")(
        nn.silu(group_norm(self.groups, self.dtype, "norm2", self.eps)(h)))
    if x_BHWC.shape[-1] != self.features:
      x_BHWC = conv(self.features, 1, dtype=self.dtype, name="conv_shortcut")(x_BHWC)
    return x_BHWC + h


class CrossAttention(nn.Module):
  """diffusers' Attention as the U-Net uses it: q / k / v without bias, to_out with bias; self-attention when
  `context` is None; `mask` [B, 1, 1, S] masks padded text keys."""
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x_BLD, context_BSD=None, mask=None):
    b, l, d = x_BLD.shape
    ctx = x_BLD if context_BSD is None else context_BSD
    head = d // self.num_heads
    dense = lambda name, axes: layers.Dense(d, axes, use_bias=False, dtype=self.dtype, name=name)
    q = dense("to_q", ("embed", "heads"))(x_BLD).reshape(b, l, self.num_heads, head)
    k = dense("to_k", ("cross", "heads"))(ctx).reshape(b, -1, self.num_heads, head)
    v = dense("to_v", ("cross", "heads"))(ctx).reshape(b, -1, self.num_heads, head)
    out = layers.attend(q, k, v, mask, implementation=self.implementation).reshape(b, l, d)
    return layers.Dense(d, ("heads", "embed"), dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
  """proj to 2 x 4d, split into (hidden, gate): hidden * gelu(gate) (exact gelu)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    h = layers.Dense(8 * x_BLD.shape[-1], ("embed", "mlp"), dtype=self.dtype, name="proj")(x_BLD)
    hidden, gate = jnp.split(h, 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD):
    h = GEGLU(self.dtype, name="net_0")(x_BLD)
    return layers.Dense(x_BLD.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="net_2")(h)


MIX_INIT = ((1.0, 0.0), (0.0, 0.0))  # (a, b) of the original and the new cross-attention: the original alone


def mix_param(module: nn.Module) -> jnp.ndarray:
  """The second cross-attention's mix [[a1, b1], [a2, b2]] (LLM Diff Adapter), the U-Net's own at init."""
  return module.param("attn_mix", layers.logical(lambda *_: jnp.asarray(MIX_INIT, jnp.float32), (None, None)),
                      (2, 2), jnp.float32)


class TransformerBlock(nn.Module):
  """`second` = (code [B, M, C], its mask [B, 1, 1, M], the global mix or None): a new cross-attention `attn2_new`
  on the code beside the original one, mixed a1 exp(b1) orig + a2 exp(b2) new (per layer unless global)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x_BLD, ctx_BSD, mask, second=None):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                                   scale_init=layers.logical(nn.initializers.ones_init(), ("embed",)),
                                   bias_init=layers.logical(nn.initializers.zeros_init(), ("embed",)))
    attn = lambda name: CrossAttention(self.num_heads, self.dtype, self.implementation, name=name)
    x_BLD = x_BLD + attn("attn1")(ln("norm1")(x_BLD))
    h = ln("norm2")(x_BLD)
    cross = attn("attn2")(h, ctx_BSD, mask)
    if second is not None:
      code, code_mask, mix = second
      mix = mix_param(self) if mix is None else mix
      w = (mix[:, 0] * jnp.exp(mix[:, 1])).astype(self.dtype)
      cross = w[0] * cross + w[1] * attn("attn2_new")(h, code, code_mask)
    x_BLD = x_BLD + cross
    return x_BLD + FeedForward(self.dtype, name="ff")(ln("norm3")(x_BLD))


class Transformer2D(nn.Module):
  """GroupNorm, projection in (1x1 conv or linear), transformer blocks over the H x W tokens, projection out,
  plus the input."""
  num_heads: int
  depth: int
  groups: int
  linear: bool
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x_BHWC, ctx_BSD, mask, second=None):
    b, hgt, wid, c = x_BHWC.shape
    h = group_norm(self.groups, self.dtype, "norm", 1e-6)(x_BHWC)
    proj = lambda name: (layers.Dense(c, ("conv_in", "conv_out"), dtype=self.dtype, name=name) if self.linear
                         else conv(c, 1, dtype=self.dtype, name=name))
    h = proj("proj_in")(h).reshape(b, hgt * wid, c)
    for i in range(self.depth):
      h = TransformerBlock(self.num_heads, self.dtype, self.implementation, name=f"transformer_blocks_{i}")(
          h, ctx_BSD, mask, second)
    return x_BHWC + proj("proj_out")(h.reshape(b, hgt, wid, c))


class Downsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):  # Downsample2D: a 3x3 conv, stride 2, padding 1
    return nn.Conv(x_BHWC.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   param_dtype=jnp.float32, name="conv",
                   kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
                   bias_init=layers.logical(nn.initializers.zeros_init(), ("conv_out",)))(x_BHWC)


class Upsample(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):  # Upsample2D: nearest 2x, then a 3x3 conv
    x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
    return conv(x_BHWC.shape[-1], dtype=self.dtype, name="conv")(x_BHWC)


@dataclasses.dataclass(frozen=True)
class _Stage:
  """What one down / mid / up block needs (a module field: hashable, static)."""
  width: int
  num_resnets: int
  attention: bool
  heads: int
  depth: int
  groups: int
  eps: float
  linear: bool
  resample: str | None  # "down" | "up" | None


class Block(nn.Module):
  """A down, mid or up block: resnets (each after concatenating a skip, for up blocks), each followed by a
  Transformer2D when `attention`, then the resampler. The mid block is a resnet, one attention, a resnet."""
  stage: _Stage
  kind: str  # "down" | "mid" | "up"
  dtype: Dtype = jnp.float32
  implementation: str | None = None
  remat: str = "none"

  @nn.compact
  def __call__(self, h, emb, ctx, mask, second=None, skips=None):
    st, dt = self.stage, self.dtype
    # Rematerialised, each resnet and transformer keeps its input (and what the policy saves) for the backward pass
    wrap = (lambda m: m) if self.remat == "none" else (
        lambda m: nn.remat(m, policy=layers.REMAT_POLICIES[self.remat], prevent_cse=False))
    resnet = lambda j: wrap(ResnetBlock)(st.width, st.groups, st.eps, dt, name=f"resnets_{j}")
    attn = lambda j: wrap(Transformer2D)(st.heads, st.depth, st.groups, st.linear, dt, self.implementation,
                                         name=f"attentions_{j}")
    if self.kind == "mid":
      return resnet(1)(attn(0)(resnet(0)(h, emb), ctx, mask, second), emb), []
    outputs = []
    for j in range(st.num_resnets):
      if self.kind == "up":
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = resnet(j)(h, emb)
      if st.attention:
        h = attn(j)(h, ctx, mask, second)
      outputs.append(h)
    if st.resample == "down":
      h = Downsample(dt, name="downsamplers_0")(h)
      outputs.append(h)
    elif st.resample == "up":
      h = Upsample(dt, name="upsamplers_0")(h)
    return h, outputs


class UNet2DConditionModel(nn.Module):
  """`apply(v, sample_BHWC, timesteps_B, context_BSD, context_valid_BS=None, text_embeds=None, time_ids=None,
  code_BMC=None, code_valid_BM=None)` -> the prediction [B, H, W, out_channels]. `text_embeds` [B, P] / `time_ids`
  [B, 6]: SDXL's added conditions. `code_BMC`: a second context (the LLM Diff Adapter's) read by a new
  cross-attention in every transformer block, mixed with the original (`second_mix`: "per_layer" or "global");
  at init the output is the plain U-Net's."""
  cfg: UNetConfig
  dtype: Dtype = jnp.float32
  attention: str | None = None
  remat: str = "none"  # a `layers.REMAT_POLICIES` key, for training at larger batches or resolutions
  second_mix: str = "per_layer"

  @nn.compact
  def __call__(self, x_BHWC, t_B, ctx_BSD, ctx_valid_BS=None, text_embeds=None, time_ids=None, code_BMC=None,
               code_valid_BM=None):
    cfg, dt = self.cfg, self.dtype
    mask = None if ctx_valid_BS is None else ctx_valid_BS.astype(bool)[:, None, None, :]
    second = None
    if code_BMC is not None:
      code_mask = None if code_valid_BM is None else code_valid_BM.astype(bool)[:, None, None, :]
      second = (code_BMC.astype(dt), code_mask, mix_param(self) if self.second_mix == "global" else None)
    t_B = jnp.broadcast_to(t_B, (x_BHWC.shape[0],))
    emb = timestep_embedding(t_B, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    emb = TimestepEmbedding(cfg.time_embed_dim, dt, name="time_embedding")(emb.astype(dt))
    if cfg.addition_embed_type == "text_time":
      assert text_embeds is not None and time_ids is not None, "SDXL's U-Net needs text_embeds and time_ids"
      ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
      added = jnp.concatenate([text_embeds.astype(jnp.float32), ids.reshape(x_BHWC.shape[0], -1)], axis=-1)
      emb = emb + TimestepEmbedding(cfg.time_embed_dim, dt, name="add_embedding")(added.astype(dt))
    n = len(cfg.block_out_channels)
    stage = lambda width, resnets, attention, heads, depth, resample: _Stage(
        width, resnets, attention, heads, depth, cfg.norm_num_groups, cfg.norm_eps, cfg.use_linear_projection,
        resample)
    block = lambda st, kind, name: Block(st, kind, dt, self.attention, self.remat, name=name)

    h = conv(cfg.block_out_channels[0], dtype=dt, name="conv_in")(x_BHWC.astype(dt))
    skips = [h]
    for i, kind in enumerate(cfg.down_block_types):
      st = stage(cfg.block_out_channels[i], cfg.layers_per_block, kind == "CrossAttnDownBlock2D", cfg.num_heads[i],
                 cfg.transformer_layers_per_block[i], "down" if i < n - 1 else None)
      h, out = block(st, "down", f"down_blocks_{i}")(h, emb, ctx_BSD, mask, second)
      skips += out
    st = stage(cfg.block_out_channels[-1], 2, True, cfg.num_heads[-1], cfg.transformer_layers_per_block[-1], None)
    h, _ = block(st, "mid", "mid_block")(h, emb, ctx_BSD, mask, second)
    for i, kind in enumerate(cfg.up_block_types):
      r = n - 1 - i  # up blocks mirror the down blocks
      st = stage(cfg.block_out_channels[r], cfg.layers_per_block + 1, kind == "CrossAttnUpBlock2D", cfg.num_heads[r],
                 cfg.transformer_layers_per_block[r], "up" if i < n - 1 else None)
      h, _ = block(st, "up", f"up_blocks_{i}")(h, emb, ctx_BSD, mask, second, skips)
    h = nn.silu(group_norm(cfg.norm_num_groups, dt, "conv_norm_out", cfg.norm_eps)(h))
    return conv(cfg.out_channels, dtype=dt, name="conv_out")(h)
