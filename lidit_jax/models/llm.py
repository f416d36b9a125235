"""Llama-style decoder-only LLM tower (RMSNorm, RoPE, GQA, SwiGLU, causal + padding mask).

LI-DiT reads a chosen layer's hidden state of a frozen LLM. `__call__` returns every layer's hidden
state, stacked [num_layers + 1, B, L, D], in Hugging Face's convention: index 0 is the embedding
output, index i the output of block i, and the last entry has the final norm applied.
Layers are scanned, so per-layer weights are stacked on a leading `layers` axis.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5

  def __post_init__(self):
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"LLM hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                       "set head_dim explicitly or change num_heads.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LLM num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}.")


class DecoderBlock(nn.Module):
  cfg: LlamaConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, mask, positions_BL):
    c = self.cfg
    h = layers.RMSNorm(c.norm_eps, dtype=self.dtype, name="input_norm")(x_BLD)
    h = layers.Attention(c.num_heads, c.num_kv_heads, c.head_dim, rope_theta=c.rope_theta,
                         dtype=self.dtype, name="attn")(h, mask=mask, positions_BL=positions_BL)
    x_BLD = x_BLD + h
    h = layers.RMSNorm(c.norm_eps, dtype=self.dtype, name="post_attn_norm")(x_BLD)
    x_BLD = x_BLD + layers.GatedMlp(c.intermediate_size, "silu", dtype=self.dtype, name="mlp")(h)
    x_BLD = layers.constrain(x_BLD, ("batch", "length", "embed"))
    return x_BLD, x_BLD


class LlamaTower(nn.Module):
  cfg: LlamaConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL):
    c = self.cfg
    valid = attention_mask_BL.astype(bool)
    # Positions count valid tokens, so left and right padding give the same features.
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    mask = layers.attention_mask(valid, valid, causal=True)
    embed = self.param("embed_tokens", layers.logical(nn.initializers.normal(0.02), ("vocab", "embed")),
                       (c.vocab_size, c.hidden_size), jnp.float32)
    x = jnp.take(embed, input_ids_BL, axis=0).astype(self.dtype)
    blocks = nn.scan(DecoderBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    last, per_layer = blocks(c, self.dtype, name="layers")(x, mask, positions)
    final = layers.RMSNorm(c.norm_eps, dtype=self.dtype, name="norm")(last)
    return jnp.concatenate([x[None], per_layer[:-1], final[None]], axis=0)


def tiny_llama(vocab_size: int, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4,
               num_kv_heads: int = 2, rope_theta: float = 10000.0) -> LlamaConfig:
  """A small random tower for the demo and tests (GQA on, so the shared code path is exercised)."""
  return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                     num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=hidden_size * 2 + 64,
                     rope_theta=rope_theta)
