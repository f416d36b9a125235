"""CLIP towers. Text: token + learned absolute position embeddings, pre-LN blocks (LayerNorm with biases,
causal + padding self-attention with biases, fc1/fc2 MLP with quick-GELU or GELU).

`__call__` returns every hidden state, stacked [num_layers + 1, B, L, D], in Hugging Face's convention:
index 0 is the embedding output, index i the output of block i. Unlike the decoder towers, no entry
has the final LayerNorm applied (the reference applies it only to `last_hidden_state`), so a tower
has no final norm. Stable Diffusion reads what a tower does not: with `cfg.head` the module also holds
the final LayerNorm (and the text projection when `cfg.projection_dim`, SDXL's second encoder) and returns
(hidden states, last_hidden_state, pooled: the end-of-text token's normed state, projected).
Blocks are scanned; per-block weights stack on a leading `layers` axis.

Image (`CLIPVisionTower`, what CLIP score reads): the same blocks without a mask over a class token and the
image's patches (a patch embedding without bias, learned positions), a LayerNorm before the blocks, and the
class token's state through a LayerNorm and the visual projection (no bias) as the image embedding.
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


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  eps: float = 1e-5
  projection_dim: int = 0  # CLIPModel's visual_projection (no bias); 0: the pooled state itself

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act={self.hidden_act!r} is not supported; supported: {list(ACTIVATIONS)}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"CLIP hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.")
    if not 0 < self.patch_size <= self.image_size:
      raise ValueError(f"CLIP patch_size {self.patch_size} must be in 1..image_size ({self.image_size}).")

  @property
  def grid(self) -> int:
    """Patches per side: a stride-p convolution drops the rows and columns past the last whole patch."""
    return self.image_size // self.patch_size


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
  cfg: CLIPTextConfig | CLIPVisionConfig  # the fields both towers share
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


class CLIPVisionTower(nn.Module):
  """pixels [B, H, W, C], normalised as the model's image processor does (H = W = image_size) ->
  (last hidden state [B, 1 + patches, D], image embedding [B, projection_dim or D])."""
  cfg: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels_BHWC):
    c = self.cfg
    want = (c.image_size, c.image_size, c.num_channels)
    if tuple(pixels_BHWC.shape[1:]) != want:
      raise ValueError(f"CLIP image tower takes images {want} (H, W, C), got {tuple(pixels_BHWC.shape[1:])}; "
                       "preprocess them with the model's image processor settings (resize, center crop).")
    p, n, side = c.patch_size, c.grid * c.grid, c.grid * c.patch_size
    patches = layers.patchify(pixels_BHWC[:, :side, :side], p).reshape(-1, n, p * p * c.num_channels)
    # The reference's stride-p conv without bias, as one matmul over each patch's (row, column, channel) values.
    x = layers.Dense(c.hidden_size, ("patch", "embed"), use_bias=False, dtype=self.dtype,
                     name="patch_embedding")(patches.astype(self.dtype))
    cls = self.param("class_embedding", layers.logical(nn.initializers.normal(0.02), ("embed",)),
                     (c.hidden_size,), jnp.float32)
    positions = self.param("position_embedding", layers.logical(nn.initializers.normal(0.02), ("length", "embed")),
                           (n + 1, c.hidden_size), jnp.float32)
    cls_B1D = jnp.broadcast_to(cls, (x.shape[0], 1, c.hidden_size)).astype(self.dtype)
    x = (jnp.concatenate([cls_B1D, x], axis=1) + positions[None]).astype(self.dtype)
    x = _layer_norm(c.eps, self.dtype, "pre_layernorm")(x)
    blocks = nn.scan(CLIPBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=nn.broadcast, length=c.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(c, self.dtype, name="layers")(x, None)  # every patch sees every patch: no mask
    pooled = _layer_norm(c.eps, self.dtype, "post_layernorm")(x[:, 0])
    if c.projection_dim:
      pooled = layers.Dense(c.projection_dim, ("embed", "mlp"), use_bias=False, dtype=self.dtype,
                            name="visual_projection")(pooled)
    return x, pooled
