"""T5 encoder tower (T5 v1.0, T5 v1.1 / Flan-T5, mT5): RMS norms, unscaled attention with a shared
relative position bias, ReLU or gated-GELU feed-forward, padding mask on keys.

`__call__` returns every hidden state, stacked [num_layers + 1, B, L, D], in Hugging Face's convention:
index 0 is the embedding output, index i the output of block i, and the last entry has the encoder's
final norm applied. Blocks are scanned, so per-block weights are stacked on a leading `layers` axis.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lidit_jax.models import layers

Dtype = Any
FEED_FORWARDS = ("relu", "gated-gelu")


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_kv: int  # per-head width; num_heads * d_kv need not equal d_model
  d_ff: int
  feed_forward: str = "relu"  # "relu" (T5 v1.0) or "gated-gelu" (T5 v1.1, Flan-T5, mT5; tanh GELU)
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6

  @property
  def hidden_size(self) -> int:  # the name the other towers use
    return self.d_model

  def __post_init__(self):
    if self.feed_forward not in FEED_FORWARDS:
      raise ValueError(f"T5 feed_forward={self.feed_forward!r} is not supported; supported: {list(FEED_FORWARDS)}.")
    if self.num_buckets < 4:  # half of them per direction, half of those exact: fewer leaves no log range
      raise ValueError(f"T5 num_buckets={self.num_buckets} is too small; it needs at least 4.")


def relative_buckets(lq: int, lk: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket [lq, lk] of each (query, key) offset: half the buckets per direction, the
  first half of those exact, the rest log-spaced up to max_distance. Depends on static shapes only, so it
  is a numpy constant; float32 arithmetic as in the reference, so boundaries land in the same bucket."""
  rel = np.arange(lk)[None, :] - np.arange(lq)[:, None]  # key - query
  half = num_buckets // 2
  exact = half // 2
  dist = np.abs(rel)
  log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
  far = exact + (log_ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)).astype(np.int64)
  far = np.minimum(far, half - 1)
  return np.where(rel > 0, half, 0) + np.where(dist < exact, dist, far)


class T5Attention(nn.Module):
  """Self-attention with an additive bias and no 1/sqrt(K) scale (T5 folds it into its init)."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, bias_1HLL, mask):
    d, h, k = x_BLD.shape[-1], self.num_heads, self.head_dim

    def proj(name):
      return layers.HeadsDense((d, h, k), "...d,dhk->...hk", ("embed", "heads", "kv"), False, self.dtype,
                               name=name)(x_BLD)

    q, key, v = proj("query"), proj("key"), proj("value")
    out = jax.nn.dot_product_attention(q, key, v, bias=bias_1HLL.astype(self.dtype), mask=mask, scale=1.0)
    # A query row with no valid key (a fully padded prompt) gives zeros rather than an average of padding.
    has_key = jnp.any(mask, axis=-1)[:, 0, :]  # [B, 1]: the mask masks keys only
    out = jnp.where(has_key[:, :, None, None], out, 0)
    return layers.HeadsDense((h, k, d), "...hk,hkd->...d", ("heads", "kv", "embed"), False, self.dtype,
                             name="out")(out)


class T5FeedForward(nn.Module):
  d_ff: int
  gated: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    def dense(features, axes, name):
      return layers.Dense(features, axes, use_bias=False, dtype=self.dtype, name=name)

    if self.gated:
      h = nn.gelu(dense(self.d_ff, ("embed", "mlp"), "wi_0")(x), approximate=True)
      h = h * dense(self.d_ff, ("embed", "mlp"), "wi_1")(x)
    else:
      h = nn.relu(dense(self.d_ff, ("embed", "mlp"), "wi")(x))
    return dense(x.shape[-1], ("mlp", "embed"), "wo")(h)


class T5Block(nn.Module):
  cfg: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, bias_1HLL, mask):
    c = self.cfg
    h = layers.RMSNorm(c.eps, dtype=self.dtype, name="attn_norm")(x_BLD)
    x_BLD = x_BLD + T5Attention(c.num_heads, c.d_kv, self.dtype, name="attn")(h, bias_1HLL, mask)
    h = layers.RMSNorm(c.eps, dtype=self.dtype, name="mlp_norm")(x_BLD)
    x_BLD = x_BLD + T5FeedForward(c.d_ff, c.feed_forward == "gated-gelu", self.dtype, name="mlp")(h)
    x_BLD = layers.constrain(x_BLD, ("batch", "length", "embed"))
    return x_BLD, x_BLD


class T5Tower(nn.Module):
  cfg: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL):
    c = self.cfg
    length = input_ids_BL.shape[1]
    valid = attention_mask_BL.astype(bool)
    mask = layers.attention_mask(valid, valid)
    embed = self.param("embed_tokens", layers.logical(nn.initializers.normal(1.0), ("vocab", "embed")),
                       (c.vocab_size, c.d_model), jnp.float32)
    # Only the reference's first block owns the table; every block adds the same bias, so it lives here.
    table = self.param("relative_attention_bias", layers.logical(nn.initializers.normal(0.02), (None, "heads")),
                       (c.num_buckets, c.num_heads), jnp.float32)
    buckets = relative_buckets(length, length, c.num_buckets, c.max_distance)
    bias = jnp.transpose(jnp.take(table, buckets, axis=0), (2, 0, 1))[None]  # [1, H, L, L]
    x = jnp.take(embed, input_ids_BL, axis=0).astype(self.dtype)
    blocks = nn.scan(T5Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    last, per_layer = blocks(c, self.dtype, name="layers")(x, bias, mask)
    final = layers.RMSNorm(c.eps, dtype=self.dtype, name="final_norm")(last)
    return jnp.concatenate([x[None], per_layer[:-1], final[None]], axis=0)
