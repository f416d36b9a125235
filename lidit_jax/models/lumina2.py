"""diffusers' Lumina2Transformer2DModel (Lumina-Image 2.0) in Linen: a context refiner over the Gemma caption
tokens (no modulation) and a noise refiner over the image tokens (modulated by time) before joint attention over
[caption; image] in every layer: LI-DiT's token refiner in all but name. Blocks: RMSNorm sandwiches, GQA with
per-head RMS QK-norm and 3-axis interleaved RoPE (caption token i at (i, 0, 0), image token (row, col) at
(caption length, row, col)), SwiGLU, tanh gates. The main layers are scanned.

diffusers packs each example's valid caption tokens before its image tokens; here the caption keeps its padded
length and its padding is masked as keys, which gives the image tokens the same attention (positions carry the
order, so where a key sits does not matter). `time(timesteps)` takes Lumina's time (0 = noise, 1 = clean, as
Lumina2Pipeline passes 1 - t / T) and returns the embedding `__call__(x, t_emb, context, valid)` reads.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Lumina2Config:
  """diffusers' Lumina2Transformer2DModel fields (Lumina-Image-2.0's values by default)."""
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  out_channels: int = 16
  hidden_size: int = 2304
  num_layers: int = 26
  num_refiner_layers: int = 2
  num_attention_heads: int = 24
  num_kv_heads: int = 8
  multiple_of: int = 256
  ffn_dim_multiplier: float = 0.0  # 0: none
  norm_eps: float = 1e-5
  axes_dim_rope: tuple[int, ...] = (32, 32, 32)
  axes_lens: tuple[int, ...] = (300, 512, 512)
  cap_feat_dim: int = 2304

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def ffn_dim(self) -> int:
    inner = 4 * self.hidden_size
    if self.ffn_dim_multiplier:
      inner = int(self.ffn_dim_multiplier * inner)
    return self.multiple_of * ((inner + self.multiple_of - 1) // self.multiple_of)

  @property
  def time_dim(self) -> int:
    return min(self.hidden_size, 1024)


def rope_tables(cfg: Lumina2Config) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per axis, (cos, sin) [axes_len, d / 2] in float64 then float32, as diffusers precomputes its freqs_cis."""
  out = []
  for d, n in zip(cfg.axes_dim_rope, cfg.axes_lens):
    freqs = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.outer(np.arange(n, dtype=np.float64), freqs)
    out.append((np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))
  return out


def rotation(cfg: Lumina2Config, positions_BS3):
  """(cos, sin) [B, S, head_dim / 2] of integer positions [B, S, 3] (the three axes' tables side by side)."""
  tables = rope_tables(cfg)
  cos = jnp.concatenate([jnp.asarray(c)[positions_BS3[..., a]] for a, (c, _) in enumerate(tables)], axis=-1)
  sin = jnp.concatenate([jnp.asarray(s)[positions_BS3[..., a]] for a, (_, s) in enumerate(tables)], axis=-1)
  return cos, sin


def rotate(x_BSHK, cos_BSK, sin_BSK):
  """Interleaved RoPE: pairs (x[2i], x[2i + 1]) turned by their angle (diffusers' use_real=False)."""
  x = x_BSHK.astype(jnp.float32).reshape(*x_BSHK.shape[:-1], -1, 2)
  c, s = cos_BSK[:, :, None, :], sin_BSK[:, :, None, :]
  out = jnp.stack([x[..., 0] * c - x[..., 1] * s, x[..., 0] * s + x[..., 1] * c], axis=-1)
  return out.reshape(x_BSHK.shape).astype(x_BSHK.dtype)


class Lumina2Block(nn.Module):
  cfg: Lumina2Config
  modulation: bool = True
  dtype: Dtype = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, x_BSD, mask, cos, sin, t_emb_BT=None):
    c, d = self.cfg, x_BSD.shape[-1]
    norm = lambda name: layers.RMSNorm(c.norm_eps, dtype=self.dtype, name=name)
    if self.modulation:
      mod = layers.Dense(4 * d, ("mlp", "embed"), dtype=self.dtype, name="norm1_linear")(nn.silu(t_emb_BT))
      scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
      h = norm("norm1")(x_BSD) * (1 + scale_msa[:, None])
    else:
      h = norm("norm1")(x_BSD)
    heads, kv, hd = c.num_attention_heads, c.num_kv_heads, c.head_dim
    proj = lambda name, n: layers.HeadsDense((d, n, hd), "...d,dhk->...hk", ("embed", "heads", "kv"), False,
                                             self.dtype, name=name)(h)
    q = layers.RMSNorm(1e-5, axis_name="kv", dtype=self.dtype, name="q_norm")(proj("query", heads))
    k = layers.RMSNorm(1e-5, axis_name="kv", dtype=self.dtype, name="k_norm")(proj("key", kv))
    att = layers.attend(rotate(q, cos, sin), rotate(k, cos, sin), proj("value", kv), mask,
                        implementation=self.attention)
    att = layers.HeadsDense((heads, hd, d), "...hk,hkd->...d", ("heads", "kv", "embed"), False, self.dtype,
                            name="out")(att)
    gate = (lambda g: jnp.tanh(g)[:, None]) if self.modulation else (lambda g: 1.0)
    x_BSD = x_BSD + gate(gate_msa if self.modulation else None) * norm("norm2")(att)
    h = norm("ffn_norm1")(x_BSD)
    if self.modulation:
      h = h * (1 + scale_mlp[:, None])
    ff = layers.GatedMlp(c.ffn_dim, dtype=self.dtype, name="feed_forward")(h)
    x_BSD = x_BSD + gate(gate_mlp if self.modulation else None) * norm("ffn_norm2")(ff)
    return layers.constrain(x_BSD, ("batch", "length", "embed"))


class ScannedLayer(nn.Module):
  """Lumina2Block with nn.scan's (carry, x) -> (carry, y) signature."""
  cfg: Lumina2Config
  dtype: Dtype = jnp.float32
  attention: str | None = None
  remat: str = "none"

  @nn.compact
  def __call__(self, x, mask, cos, sin, t_emb):
    block = Lumina2Block
    if self.remat != "none":
      block = nn.remat(Lumina2Block, policy=layers.REMAT_POLICIES[self.remat], prevent_cse=False)
    return block(self.cfg, True, self.dtype, self.attention, name="block")(x, mask, cos, sin, t_emb), None


class Lumina2Transformer(nn.Module):
  cfg: Lumina2Config
  dtype: Dtype = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  def setup(self):
    self.t_embedder = layers.TimestepEmbedder(self.cfg.time_dim, dtype=self.dtype, scale=1.0)

  def time(self, timesteps_B):
    return self.t_embedder(timesteps_B)

  @nn.compact
  def __call__(self, x_BHWC, t_emb_BT, ctx_BSC, ctx_valid_BS):
    c, w = self.cfg, self.cfg.hidden_size
    b, hh, ww, ch = x_BHWC.shape
    p = c.patch_size
    gh, gw = hh // p, ww // p
    impl = None if self.attention == "xla" else self.attention
    cap = layers.RMSNorm(c.norm_eps, dtype=self.dtype, name="caption_norm")(ctx_BSC.astype(self.dtype))
    cap = layers.Dense(w, ("mlp", "embed"), dtype=self.dtype, name="caption_proj")(cap)
    x = layers.Dense(w, ("patch", "embed"), dtype=self.dtype, name="x_embedder")(
        layers.patchify(x_BHWC, p).reshape(b, gh * gw, -1).astype(self.dtype))

    length = cap.shape[1]
    if length >= c.axes_lens[0]:  # caption positions and the image's first axis must stay inside the RoPE table
      raise ValueError(f"a context of {length} tokens: Lumina 2's positions take fewer than axes_lens[0]="
                       f"{c.axes_lens[0]}. Fix: shorten the text towers' max_length")
    valid = ctx_valid_BS.astype(bool)
    lens = jnp.sum(valid, axis=1).astype(jnp.int32)
    zeros = jnp.zeros((b, length), jnp.int32)
    cap_pos = jnp.stack([jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)), zeros, zeros], -1)
    rows, cols = (a.reshape(-1) for a in jnp.meshgrid(jnp.arange(gh, dtype=jnp.int32), jnp.arange(gw, dtype=jnp.int32),
                                                      indexing="ij"))
    img_pos = jnp.stack([jnp.broadcast_to(lens[:, None], (b, gh * gw)), jnp.broadcast_to(rows, (b, gh * gw)),
                         jnp.broadcast_to(cols, (b, gh * gw))], -1)
    cap_rot, img_rot = rotation(c, cap_pos), rotation(c, img_pos)

    cap_mask = layers.attention_mask(None, valid)
    for i in range(c.num_refiner_layers):
      cap = Lumina2Block(c, False, self.dtype, impl, name=f"context_refiner_{i}")(cap, cap_mask, *cap_rot)
    for i in range(c.num_refiner_layers):
      x = Lumina2Block(c, True, self.dtype, impl, name=f"noise_refiner_{i}")(x, None, *img_rot, t_emb_BT)

    joint = jnp.concatenate([cap, x], axis=1)
    joint_mask = layers.attention_mask(None, jnp.concatenate([valid, jnp.ones((b, gh * gw), bool)], axis=1))
    cos, sin = (jnp.concatenate([a, b_], axis=1) for a, b_ in zip(cap_rot, img_rot))
    blocks = nn.scan(ScannedLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast,) * 4, length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    joint, _ = blocks(c, self.dtype, impl, self.remat, name="layers")(joint, joint_mask, cos, sin, t_emb_BT)

    scale = layers.Dense(w, ("mlp", "embed"), dtype=self.dtype, name="norm_out_linear")(nn.silu(t_emb_BT))
    out = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=self.dtype)(joint[:, length:])
    out = layers.Dense(p * p * c.out_channels, ("embed", "patch"), dtype=self.dtype, name="final_proj")(
        out * (1 + scale[:, None]))
    return layers.unpatchify(out, (gh, gw), p).astype(jnp.float32)


def forward(module: Lumina2Transformer, x_BHWC, timesteps_B, ctx_BSC, ctx_valid_BS):
  """Both methods in one call (`module.apply(..., method=forward)`: init, conversion, parity)."""
  return module(x_BHWC, module.time(timesteps_B), ctx_BSC, ctx_valid_BS)


def abstract_inputs(cfg: Lumina2Config, batch: int = 1, text_length: int = 4) -> tuple:
  sds, s = jax.ShapeDtypeStruct, 2 * cfg.patch_size
  return (sds((batch, s, s, cfg.in_channels), jnp.float32), sds((batch,), jnp.float32),
          sds((batch, text_length, cfg.cap_feat_dim), jnp.float32), sds((batch, text_length), jnp.bool_))
