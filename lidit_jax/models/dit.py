"""The LI-DiT backbone: patchify -> positional ResBlock -> [self-attn, cross-attn, MLP] x depth -> unpatchify.

Each block is modulated (adaLN-Zero: shift, scale, gate per sub-layer) by c = timestep embedding +
pooled text. Self- and cross-attention use RMSNorm QK-norm; cross-attention masks padded and
instruction text tokens. Blocks are scanned (`nn.scan`) so compile time is flat in depth.

`modulation="single"` is PixArt-alpha's adaLN-single instead: one projection of c to 6 x width shared by
all blocks, plus a learned (6, width) table per block; cross-attention is then neither normed,
modulated nor gated (as diffusers' PixArtTransformer2DModel, for side-by-side benchmarks).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lidit_jax.models import layers

Dtype = Any

@dataclasses.dataclass(frozen=True)
class DiTConfig:
  width: int
  depth: int
  num_heads: int
  patch_size: int = 2
  in_channels: int = 4
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  pos_embed: str = "resblock"  # "resblock" (LI-DiT), "sincos", or "both"
  remat: str = "none"
  scan: bool = True
  attention: str = "xla"  # "xla", "cudnn" (GPU), "splash" (TPU): see model.attention_implementation
  modulation: str = "block"  # "block": adaLN-Zero per block (LI-DiT); "single": PixArt-alpha's adaLN-single
  out_channels: int = 0  # 0: in_channels; PixArt's learned sigma doubles them
  # sin-cos positions in diffusers' PixArt layout when > 0: the grid side the table was trained at (positions
  # scaled by pos_base / side / pos_interpolation, x first); 0: integer positions, y first (LI-DiT's)
  pos_base: int = 0
  pos_interpolation: float = 1.0


def pixart_alpha(width: int, heads: int, depth: int, patch: int = 2, channels: int = 4) -> DiTConfig:
  """Our DiT with PixArt-alpha's choices: adaLN-single, sin-cos positions, no QK-norm (layer for layer the
  parameters of diffusers' PixArtTransformer2DModel with `pixart_diffusers_kwargs`, but its caption projection)."""
  return DiTConfig(width=width, depth=depth, num_heads=heads, patch_size=patch, in_channels=channels,
                   qk_norm=False, pos_embed="sincos", modulation="single", scan=True)


def pixart_diffusers_kwargs(cfg: DiTConfig, latent: int) -> dict:
  """diffusers' PixArtTransformer2DModel arguments for the same network as `cfg` (from `pixart_alpha`)."""
  return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.width // cfg.num_heads,
              in_channels=cfg.in_channels, out_channels=cfg.in_channels, num_layers=cfg.depth,
              cross_attention_dim=cfg.width, caption_channels=cfg.width, sample_size=latent,
              patch_size=cfg.patch_size, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
              attention_bias=True, activation_fn="gelu-approximate")


class DiTBlock(nn.Module):
  cfg: DiTConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, ctx_BSD, ctx_mask, c_BD):
    """c_BD: the conditioning vector, or with modulation="single" the shared projection [B, 6 x width]."""
    c = self.cfg
    d = x_BLD.shape[-1]
    impl = None if c.attention == "xla" else c.attention
    attention = lambda name: layers.Attention(c.num_heads, qk_norm=c.qk_norm, use_bias=True, dtype=self.dtype,
                                              implementation=impl, name=name)
    if c.modulation == "single":
      table = self.param("scale_shift_table", layers.logical(nn.initializers.normal(d ** -0.5), (None, "embed")),
                         (6, d), jnp.float32)
      mod = table[None].astype(self.dtype) + c_BD.reshape(-1, 6, d).astype(self.dtype)
      sh_sa, sc_sa, g_sa, sh_mlp, sc_mlp, g_mlp = (mod[:, k] for k in range(6))
    else:
      mod = layers.Dense(9 * d, ("embed", "mlp"), zero_init=True, dtype=self.dtype, name="modulation")(nn.silu(c_BD))
      sh_sa, sc_sa, g_sa, sh_ca, sc_ca, g_ca, sh_mlp, sc_mlp, g_mlp = jnp.split(mod, 9, axis=-1)

    h = layers.modulate(layers.layer_norm(self.dtype, name="norm_sa")(x_BLD), sh_sa, sc_sa)
    x_BLD = x_BLD + g_sa[:, None, :] * attention("self_attn")(h)

    if c.modulation == "single":
      x_BLD = x_BLD + attention("cross_attn")(x_BLD, ctx_BSD, mask=ctx_mask)
    else:
      h = layers.modulate(layers.layer_norm(self.dtype, name="norm_ca")(x_BLD), sh_ca, sc_ca)
      x_BLD = x_BLD + g_ca[:, None, :] * attention("cross_attn")(h, ctx_BSD, mask=ctx_mask)

    h = layers.modulate(layers.layer_norm(self.dtype, name="norm_mlp")(x_BLD), sh_mlp, sc_mlp)
    x_BLD = x_BLD + g_mlp[:, None, :] * layers.Mlp(int(d * c.mlp_ratio), dtype=self.dtype, name="mlp")(h)
    return layers.constrain(x_BLD, ("batch", "length", "embed"))


class ScannedBlock(nn.Module):
  """Adapter giving DiTBlock the (carry, x) -> (carry, y) signature that nn.scan wants."""
  cfg: DiTConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, ctx_BSD, ctx_mask, c_BD):
    block = DiTBlock
    if self.cfg.remat != "none":
      block = nn.remat(DiTBlock, policy=layers.REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
    return block(self.cfg, self.dtype, name="block")(x_BLD, ctx_BSD, ctx_mask, c_BD), None


class PositionResBlock(nn.Module):
  """LI-DiT's positional signal: a convolutional ResBlock on the patch grid (zero padding lets it see
  where the borders are); the last conv starts at zero so the block starts as the identity."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWD):
    d = x_BHWD.shape[-1]
    def conv(name, zero=False):
      init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
      return nn.Conv(d, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32, name=name,
                     kernel_init=layers.logical(init, (None, None, "mlp", "embed")),
                     bias_init=layers.logical(nn.initializers.zeros_init(), ("embed",)))
    # The convs' inputs and outputs are held to batch-only sharding: without it, XLA's SPMD partitioner
    # (jax 0.10.2, Shardy; seen on CPU) swaps examples between batch shards inside two chained convs whose
    # kernels are sharded over fsdp x tensor (a data=2, fsdp=2, tensor=2 mesh trained this block on the wrong
    # examples). One device is unchanged, bit for bit. tests/test_scale.py checks gradients against one device.
    c = lambda a: layers.constrain(a, ("batch", None, None, None))
    h = c(conv("conv1")(c(nn.silu(layers.layer_norm(self.dtype, affine=True, name="norm1")(x_BHWD)))))
    h = c(conv("conv2", zero=True)(c(nn.silu(layers.layer_norm(self.dtype, affine=True, name="norm2")(h)))))
    return x_BHWD + h


class DiT(nn.Module):
  """Denoiser on [B, H, W, C] latents; predicts the velocity with the same shape (out_channels: PixArt's
  prediction and its learned variance). `text_pooled_BD` None: no pooled text (PixArt's)."""
  cfg: DiTConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, t_emb_BD, text_pooled_BD, ctx_BSD, ctx_valid_BS):
    c = self.cfg
    b, hh, ww, ch = x_BHWC.shape
    p = c.patch_size
    assert hh % p == 0 and ww % p == 0, f"image {hh}x{ww} is not divisible by patch size {p}"
    assert ch == c.in_channels, f"expected {c.in_channels} channels, got {ch}"
    gh, gw = hh // p, ww // p

    x = layers.Dense(c.width, ("patch", "embed"), dtype=self.dtype, name="patch_embed")(
        layers.patchify(x_BHWC, p).astype(self.dtype))
    if c.pos_embed in ("resblock", "both"):
      x = PositionResBlock(self.dtype, name="pos_resblock")(x)
    x = x.reshape(b, gh * gw, c.width)
    if c.pos_embed in ("sincos", "both"):
      table = (layers.sincos_2d(gh, gw, c.width) if not c.pos_base else layers.sincos_2d(
          gh, gw, c.width, c.pos_base / gh / c.pos_interpolation, c.pos_base / gw / c.pos_interpolation, x_first=True))
      x = x + table.astype(self.dtype)[None]
    x = layers.constrain(x, ("batch", "length", "embed"))

    cond = t_emb_BD.astype(self.dtype)
    if text_pooled_BD is not None:  # PixArt reads no pooled text
      cond = cond + layers.Dense(c.width, ("mlp", "embed"), dtype=self.dtype, name="text_pool_proj")(
          text_pooled_BD.astype(self.dtype))
    ctx_mask = layers.attention_mask(None, ctx_valid_BS)
    ctx = ctx_BSD.astype(self.dtype)
    block_cond = cond
    if c.modulation == "single":  # adaLN-single: one projection for every block
      block_cond = layers.Dense(6 * c.width, ("embed", "mlp"), zero_init=True, dtype=self.dtype,
                                name="shared_modulation")(nn.silu(cond))
    if c.scan:
      blocks = nn.scan(ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.depth,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = blocks(c, self.dtype, name="blocks")(x, ctx, ctx_mask, block_cond)
    else:
      for i in range(c.depth):
        x, _ = ScannedBlock(c, self.dtype, name=f"blocks_{i}")(x, ctx, ctx_mask, block_cond)

    if c.modulation == "single":  # PixArt: a learned (2, width) table plus the conditioning vector itself
      table = self.param("final_scale_shift_table", layers.logical(nn.initializers.normal(c.width ** -0.5),
                                                                   (None, "embed")), (2, c.width), jnp.float32)
      shift, scale = table[0][None] + cond, table[1][None] + cond
    else:
      mod = layers.Dense(2 * c.width, ("embed", "mlp"), zero_init=True, dtype=self.dtype, name="final_modulation")(
          nn.silu(cond))
      shift, scale = jnp.split(mod, 2, axis=-1)
    x = layers.modulate(layers.layer_norm(self.dtype, name="final_norm")(x), shift, scale)
    x = layers.Dense(p * p * (c.out_channels or ch), ("embed", "patch"), zero_init=True, dtype=self.dtype,
                     name="final_proj")(x)
    return layers.unpatchify(x, (gh, gw), p).astype(jnp.float32)
