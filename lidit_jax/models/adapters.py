"""LLM4GEN's Cross-Adapter Module (CAM): LLM features refined by cross-attention to the frozen CLIP text features,
then set beside them as the U-Net's context (facts: ../shared/PAPERS.md section 4, the released inference).

Per block: llm = llm_proj(llm) (first block only: the LLM's width -> the CLIP width); queries from the normed LLM
tokens (`kv_norm`, the release's names are swapped), keys and values from the normed CLIP tokens (`q_norm`),
multi-head attention + residual (scaled by `lam`, the paper's lambda; released: 1); then FFN(norm(llm)) + residual
with a QuickGELU FFN. The output is the CLIP tokens followed by the refined LLM tokens ([B, L + M, D]; `llm_first`
swaps them, as the paper's figure draws it).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.models import layers

Dtype = Any


def _layer_norm(name: str, dtype) -> nn.LayerNorm:
  # torch's LayerNorm: eps 1e-5, two-pass variance
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name,
                      scale_init=layers.logical(nn.initializers.ones_init(), ("embed",)),
                      bias_init=layers.logical(nn.initializers.zeros_init(), ("embed",)))


class CrossAdapterBlock(nn.Module):
  num_heads: int = 8
  mlp_ratio: int = 4
  lam: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, clip_BLD, llm_BMD):
    d = clip_BLD.shape[-1]
    attn = layers.Attention(self.num_heads, use_bias=True, dtype=self.dtype, name="attn")
    llm_BMD = llm_BMD + self.lam * attn(_layer_norm("kv_norm", self.dtype)(llm_BMD),
                                        _layer_norm("q_norm", self.dtype)(clip_BLD))
    h = _layer_norm("norm", self.dtype)(llm_BMD)
    h = layers.Dense(self.mlp_ratio * d, ("embed", "mlp"), dtype=self.dtype, name="fc1")(h)
    h = layers.Dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h * jax.nn.sigmoid(1.702 * h))
    return llm_BMD + h


class CrossAdapter(nn.Module):
  """`apply(v, clip_BLD, llm_BMD)` -> the fused context [B, L + M, D] (D: the CLIP width). The LLM tokens are the
  queries and CLIP's are never padded (SD runs CLIP without a mask), so no mask enters here; masking padded LLM
  tokens is the context validity's business (the conditioner's option)."""
  num_blocks: int = 1
  num_heads: int = 8
  mlp_ratio: int = 4
  lam: float = 1.0
  llm_first: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, clip_BLD, llm_BMD):
    assert clip_BLD.ndim == 3 and llm_BMD.ndim == 3
    clip_BLD = clip_BLD.astype(self.dtype)
    llm_BMD = layers.Dense(clip_BLD.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="llm_proj")(
        llm_BMD.astype(self.dtype))
    for i in range(self.num_blocks):
      llm_BMD = CrossAdapterBlock(self.num_heads, self.mlp_ratio, self.lam, self.dtype, name=f"block_{i}")(
          clip_BLD, llm_BMD)
    parts = (llm_BMD, clip_BLD) if self.llm_first else (clip_BLD, llm_BMD)
    return jnp.concatenate(parts, axis=1)
