"""LI-DiT's text refiners: the linguistic token refiner (one per LLM) and the collaborative refiner.

Both are conditioned on c = timestep embedding + MLP(pooled LLM features), so they run inside the
denoiser at every step. Instruction tokens flow through both and are masked out afterwards (model.py).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.models import layers

Dtype = Any


class RefinerBlock(nn.Module):
  """LN -> self-attention -> gated residual; LN -> MLP -> gated residual.

  Gates come from Linear(SiLU(c)) initialised at zero, so the block starts as the identity
  ("adaptive gating"); `gated=False` is the paper's ablation with plain residuals. `rope_theta` adds rotary
  positions to the self-attention (off in the paper, whose trained LLMs already encode word order).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  gated: bool = True
  qk_norm: bool = True
  rope_theta: float | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, valid_BL, c_BD):
    d = x_BLD.shape[-1]
    mask = layers.attention_mask(valid_BL, valid_BL, causal=self.causal)
    if self.gated:
      g = layers.Dense(2 * d, ("embed", "mlp"), zero_init=True, dtype=self.dtype, name="gates")(nn.silu(c_BD))
      g_attn, g_mlp = (v[:, None, :] for v in jnp.split(g, 2, axis=-1))
    else:
      g_attn = g_mlp = 1.0
    h = layers.layer_norm(self.dtype, affine=True, name="norm1")(x_BLD)
    positions = None if self.rope_theta is None else jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])
    h = layers.Attention(self.num_heads, qk_norm=self.qk_norm, use_bias=True, rope_theta=self.rope_theta,
                         dtype=self.dtype, name="attn")(h, mask=mask, positions_BL=positions)
    x_BLD = x_BLD + g_attn * h
    h = layers.layer_norm(self.dtype, affine=True, name="norm2")(x_BLD)
    x_BLD = x_BLD + g_mlp * layers.Mlp(int(d * self.mlp_ratio), dtype=self.dtype, name="mlp")(h)
    return layers.constrain(x_BLD, ("batch", "length", "embed"))


class TokenRefiner(nn.Module):
  """Linguistic token refiner for one LLM: project to the refiner width, then `depth` refiner blocks.

  Returns the refined tokens [B, L, D] and this tower's conditioning vector c [B, D].
  """
  width: int
  depth: int = 2
  num_heads: int = 8
  mlp_ratio: float = 4.0
  causal: bool = False
  gated: bool = True
  qk_norm: bool = True
  rope_theta: float | None = None
  feature_norm: bool = False  # RMS-normalise each token's features first (no weights)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats_BLE, valid_BL, pool_BL, t_emb_BD):
    feats_BLE = feats_BLE.astype(self.dtype)
    if self.feature_norm:
      feats_BLE = layers.RMSNorm(use_scale=False, dtype=self.dtype, name="feature_norm")(feats_BLE)
    x = layers.Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="in_proj")(feats_BLE)
    pooled = layers.masked_mean(feats_BLE, pool_BL)
    pooled = layers.Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="pool_fc1")(pooled)
    pooled = layers.Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="pool_fc2")(nn.silu(pooled))
    t = t_emb_BD.astype(self.dtype)
    if t.shape[-1] != self.width:  # a backbone whose time embedding is not its context's width (PixArt, Sana)
      t = layers.Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="time_proj")(t)
    c = t + pooled
    for i in range(self.depth):
      x = RefinerBlock(self.num_heads, self.mlp_ratio, self.causal, self.gated, self.qk_norm, self.rope_theta,
                       self.dtype, name=f"block_{i}")(x, valid_BL, c)
    return x, c


class CollaborativeBranch(nn.Module):
  """One LLM's branch: cross-attention from its tokens to the other LLMs' tokens, then an FFN,
  each modulated (shift, scale, gate) by the branch's conditioning vector; zero-init gates."""
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, others_BSD, others_valid_BS, c_BD):
    d = x_BLD.shape[-1]
    mod = layers.Dense(6 * d, ("embed", "mlp"), zero_init=True, dtype=self.dtype, name="modulation")(nn.silu(c_BD))
    sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)
    mask = layers.attention_mask(None, others_valid_BS)
    h = layers.modulate(layers.layer_norm(self.dtype, name="norm_q")(x_BLD), sh1, sc1)
    kv = layers.layer_norm(self.dtype, affine=True, name="norm_kv")(others_BSD)
    h = layers.Attention(self.num_heads, qk_norm=self.qk_norm, use_bias=True, dtype=self.dtype, name="cross_attn")(
        h, kv, mask=mask)
    x_BLD = x_BLD + g1[:, None, :] * h
    h = layers.modulate(layers.layer_norm(self.dtype, name="norm_mlp")(x_BLD), sh2, sc2)
    x_BLD = x_BLD + g2[:, None, :] * layers.Mlp(int(d * self.mlp_ratio), dtype=self.dtype, name="mlp")(h)
    return layers.constrain(x_BLD, ("batch", "length", "embed"))


class CollaborativeRefiner(nn.Module):
  """One block, one branch per LLM; each branch's keys/values are all the other LLMs' tokens."""
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], valids: Sequence[jax.Array], cs: Sequence[jax.Array]):
    assert len(xs) >= 2, "the collaborative refiner needs at least two LLM streams"
    out = []
    for i, (x, c) in enumerate(zip(xs, cs)):
      others = jnp.concatenate([x_ for j, x_ in enumerate(xs) if j != i], axis=1)
      others_valid = jnp.concatenate([v for j, v in enumerate(valids) if j != i], axis=1)
      out.append(CollaborativeBranch(self.num_heads, self.mlp_ratio, self.qk_norm, self.dtype,
                                     name=f"branch_{i}")(x, others, others_valid, c))
    return out
