"""CLIP text tower: token + learned absolute position embeddings, pre-LN blocks (LayerNorm with biases,
causal + padding self-attention with biases, fc1/fc2 MLP with quick-GELU or GELU).

`__call__` returns every hidden state, stacked [num_layers + 1, B, L, D], in Hugging Face's convention:
index 0 is the embedding output, index i the output of block i. Unlike the decoder towers, no entry
has the final LayerNorm applied (the reference applies it only to `last_hidden_state`), so a tower
has no final norm. Stable Diffusion reads what a tower does not: with `cfg.head` the module also holds
the final LayerNorm (and the text projection when `cfg.projection_dim`, SDXL's second encoder) and returns
(hidden states, last_hidden_state, pooled: the end-of-text token's normed state, projected).
Blocks are scanned; per-block weights stack on a leading `layers` axis.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.models import layers

Dtype = Any
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int = 77
  hidden_act: str = "quick_gelu"
  eps: float = 1e-5
  head: bool = False  # final LayerNorm + pooled output (+ projection): what SD pipelines read
  projection_dim: int = 0  # CLIPTextModelWithProjection's text_projection (no bias); 0: none
  eos_token_id: int = 2  # pooling: 2 (old configs) pools at the largest id, any other at its first occurrence

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act={self.hidden_act!r} is not supported; supported: {list(ACTIVATIONS)}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"CLIP hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.")


def _activation(name: str):
  if name == "quick_gelu":  # the sigmoid approximation of GELU that OpenAI's CLIP was trained with
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  return lambda x: nn.gelu(x, approximate=False)


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance, as the reference computes it (the fast E[x^2] - E[x]^2 form loses digits).
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name,
                      scale_init=layers.logical(nn.initializers.ones_init(), ("embed",)),
                      bias_init=layers.logical(nn.initializers.zeros_init(), ("embed",)))


class CLIPBlock(nn.Module):
  cfg: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, mask):
    c = self.cfg
    h = _layer_norm(c.eps, self.dtype, "norm1")(x_BLD)
    x_BLD = x_BLD + layers.Attention(c.num_heads, use_bias=True, dtype=self.dtype, name="attn")(h, mask=mask)
    h = _layer_norm(c.eps, self.dtype, "norm2")(x_BLD)
    h = layers.Dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="fc1")(h)
    h = layers.Dense(c.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="fc2")(_activation(c.hidden_act)(h))
    x_BLD = layers.constrain(x_BLD + h, ("batch", "length", "embed"))
    return x_BLD, x_BLD


class CLIPTextTower(nn.Module):
  cfg: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BL, attention_mask_BL):
    c = self.cfg
    length = input_ids_BL.shape[1]
    if length > c.max_positions:
      raise ValueError(f"CLIP text length {length} exceeds its {c.max_positions} position embeddings; "
                       f"truncate prompts to at most {c.max_positions} tokens.")
    valid = attention_mask_BL.astype(bool)
    mask = layers.attention_mask(valid, valid, causal=True)
    tokens = self.param("token_embedding", layers.logical(nn.initializers.normal(0.02), ("vocab", "embed")),
                        (c.vocab_size, c.hidden_size), jnp.float32)
    positions = self.param("position_embedding", layers.logical(nn.initializers.normal(0.01), ("length", "embed")),
                           (c.max_positions, c.hidden_size), jnp.float32)
    # Positions are 0..L-1 regardless of padding, as in the reference (CLIP prompts are right-padded).
    x = (jnp.take(tokens, input_ids_BL, axis=0) + positions[None, :length]).astype(self.dtype)
    blocks = nn.scan(CLIPBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=c.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    _, per_layer = blocks(c, self.dtype, name="layers")(x, mask)
    hidden = jnp.concatenate([x[None], per_layer], axis=0)
    if not c.head:
      return hidden
    last = _layer_norm(c.eps, self.dtype, "final_layer_norm")(hidden[-1])
    where = input_ids_BL if c.eos_token_id == 2 else (input_ids_BL == c.eos_token_id).astype(jnp.int32)
    pooled = jnp.take_along_axis(last, jnp.argmax(where, axis=-1)[:, None, None], axis=1)[:, 0]
    if c.projection_dim:
      pooled = layers.Dense(c.projection_dim, ("embed", "mlp"), use_bias=False, dtype=self.dtype,
                            name="text_projection")(pooled)
    return hidden, last, pooled


def final_norm(cfg: CLIPTextConfig, params, x):
  """The final LayerNorm of a tower with its head (`params`: the tower's) on any hidden state: SD 1.x / 2.x's
  last_hidden_state at layer -1, diffusers' `clip_skip` at earlier ones."""
  return _layer_norm(cfg.eps, x.dtype, "final_layer_norm").apply({"params": params["final_layer_norm"]}, x)
