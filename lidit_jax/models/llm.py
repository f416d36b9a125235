"""Decoder-only LLM towers: Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3 and Gemma 2 in one module.

The families differ only in switches of `DecoderConfig` (q/k/v biases, per-head q/k norms, rope scaling,
Gemma's scaled embeddings, (1 + w) norms, sandwich norms, soft-capped logits, sliding-window layers).
LI-DiT reads a chosen layer's hidden state of a frozen LLM. `__call__` returns every hidden state,
stacked [num_layers + 1, B, L, D], in Hugging Face's convention: index 0 is the embedding output, index
i the output of block i, and the last entry has the final norm applied. `up_to_layer` stops early (only
that many blocks run), which is what a frozen tower feeding LI-DiT needs.
Layers are scanned, so per-layer weights are stacked on a leading `layers` axis. Kernels keep PyTorch's
[out, in] order, so converting a checkpoint is a read and a reshape, never a transpose.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lidit_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()  # (name, value) pairs, see layers.rope_frequencies
  norm_eps: float = 1e-5
  qkv_bias: bool = False  # Qwen2
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm per head on queries and keys, before RoPE
  activation: str = "silu"  # "gelu_tanh" for Gemma
  embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  norm_unit_offset: bool = False  # Gemma: norms scale by (1 + w)
  sandwich_norms: bool = False  # Gemma 2: norms after attention and MLP as well as before
  attn_softcap: float | None = None  # Gemma 2
  query_scale: float | None = None  # Gemma 2 query_pre_attn_scalar: logits scaled by its inverse sqrt
  windows: tuple[int, ...] = ()  # per layer: sliding-window size, 0 = full causal attention

  def __post_init__(self):
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"LLM hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                       "set head_dim explicitly or change num_heads.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LLM num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}.")
    if self.windows and len(self.windows) != self.num_layers:
      raise ValueError(f"LLM windows has {len(self.windows)} entries for {self.num_layers} layers.")


class DecoderBlock(nn.Module):
  cfg: DecoderConfig
  dtype: Dtype = jnp.float32
  keep_index: int | None = None  # carry this block's output instead of stacking every layer's
  alone: str | None = None  # emit the Diff Adapter's score instead of the output (DecoderLM.alone)

  def setup(self):
    c = self.cfg
    norm = lambda name: layers.RMSNorm(c.norm_eps, unit_offset=c.norm_unit_offset, dtype=self.dtype, name=name)
    self.input_norm, self.post_attn_norm = norm("input_norm"), norm("post_attn_norm")
    if c.sandwich_norms:
      self.post_attn_out_norm, self.post_mlp_norm = norm("post_attn_out_norm"), norm("post_mlp_norm")
    self.attn = layers.Attention(c.num_heads, c.num_kv_heads, c.head_dim, qk_norm=c.qk_norm, use_bias=c.qkv_bias,
                                 out_bias=c.out_bias, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                                 scale=None if c.query_scale is None else c.query_scale ** -0.5,
                                 logit_softcap=c.attn_softcap, norm_eps=c.norm_eps, torch_layout=True,
                                 dtype=self.dtype, name="attn")
    self.mlp = layers.GatedMlp(c.intermediate_size, c.activation, c.mlp_bias, torch_layout=True, dtype=self.dtype,
                               name="mlp")

  def block(self, x_BLD, mask, positions_BL):
    """The block's output: x + attention, then + MLP (pre-norms; Gemma 2's sandwich norms too)."""
    h = self.attn(self.input_norm(x_BLD), mask=mask, positions_BL=positions_BL)
    x_BLD = x_BLD + (self.post_attn_out_norm(h) if self.cfg.sandwich_norms else h)
    h = self.mlp(self.post_attn_norm(x_BLD))
    return x_BLD + (self.post_mlp_norm(h) if self.cfg.sandwich_norms else h)

  def __call__(self, carry, mask, positions_BL, scanned):
    x_BLD, keep = carry
    window, index = scanned
    # Sliding window over token indices (as the reference), on top of the causal + padding mask.
    idx = jnp.arange(x_BLD.shape[1])
    near = (idx[:, None] - idx[None, :]) < jnp.where(window > 0, window, x_BLD.shape[1] + 1)
    out = layers.constrain(self.block(x_BLD, mask & near[None, None], positions_BL), ("batch", "length", "embed"))
    if self.alone is not None:  # the update with context minus the update of each token alone (`keep`: its input)
      alone = (x_BLD if self.alone == "diagonal" else keep)
      alone_out = self.block(alone, jnp.eye(x_BLD.shape[1], dtype=bool)[None, None], positions_BL)
      score = layers.constrain(out - x_BLD - (alone_out - alone), ("batch", "length", "embed"))
      return (out, alone_out if self.alone == "trajectory" else keep), score
    if self.keep_index is None:  # every hidden state is wanted: emit each layer's output
      return (out, keep), out
    # One layer is wanted: carry it instead of stacking all of them ([layers, B, L, D] is huge at 8B).
    return (out, jnp.where(index == self.keep_index, out, keep)), None


class DecoderLM(nn.Module):
  """`__call__(input_ids, attention_mask)` -> hidden states [num_layers + 1, B, L, D], or only entry
  `output_layer` ([B, L, D]; negative counts from the end, as in Python) when that is set.

  `alone` (the LLM Diff Adapter's scores, PAPERS.md section 3): entry 0 the embedding output, entry t block t's
  update of each token with its context minus its update of the token alone, both from block t's input
  ("diagonal": the same block, attention restricted to the token itself: one extra pass per block), or minus the
  update along a trajectory of tokens alone from the embeddings ("trajectory": a second, context-free run)."""
  cfg: DecoderConfig
  dtype: Dtype = jnp.float32
  output_layer: int | None = None
  alone: str | None = None  # None | "diagonal" | "trajectory"

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
    if c.embed_scale:  # the reference rounds the factor to the activation dtype
      x = x * jnp.asarray(c.hidden_size ** 0.5, self.dtype)
    n = c.num_layers
    if self.output_layer is not None and not -(n + 1) <= self.output_layer <= n:
      raise ValueError(f"output_layer={self.output_layer} is out of range for {n} layers (hidden states 0..{n}).")
    layer = None if self.output_layer is None else self.output_layer % (n + 1)
    keep_index = None if layer is None else (layer - 1 if 0 < layer < n else -1)
    scanned = (jnp.asarray(c.windows or (0,) * n, jnp.int32), jnp.arange(n))
    blocks = nn.scan(DecoderBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast, 0), length=n,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    (last, kept), per_layer = blocks(c, self.dtype, keep_index, self.alone, name="layers")(
        (x, x), mask, positions, scanned)
    if self.alone is not None:
      return jnp.concatenate([x[None], per_layer], axis=0)
    final = layers.RMSNorm(c.norm_eps, unit_offset=c.norm_unit_offset, dtype=self.dtype, name="norm")(last)
    if layer is None:
      return jnp.concatenate([x[None], per_layer[:-1], final[None]], axis=0)
    return {0: x, n: final}.get(layer, kept)


def tiny_llama(vocab_size: int, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4,
               num_kv_heads: int = 2, rope_theta: float = 10000.0) -> DecoderConfig:
  """A small random tower for the demo and tests (GQA on, so the shared code path is exercised)."""
  return DecoderConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                       num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=hidden_size * 2 + 64,
                       rope_theta=rope_theta)
