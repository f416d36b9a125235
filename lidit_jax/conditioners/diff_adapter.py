"""The LLM Diff Adapter (`conditioner.kind=diff_adapter`, options in `conditioner.diff`; facts and open readings:
PAPERS.md section 3): a decoder-only LLM read as a diffusion chain over its blocks. The tower `diff.llm` gives its
per-block scores (`text.towers.NAME.output="scores"`: entry 0 the embedding output, entry t block t's update of
each token with its context minus its update of the token alone; `alone` picks the reading). Here they are
accumulated, Langevin-style, into the text code

  c = c^T + sum_t g_t score_t (+ sqrt(2 sum_t h_t) eps in training: the sum of the blocks' independent noises)

and handed on twice: the backbone's context phi(c) (a linear alignment to its width: the U-Net's original
cross-attention reads it) and the code c itself (a U-Net's new cross-attention, `unet.second_attention`; a DiT
reads phi(c) only).

Open readings, each an option (defaults in brackets): c^T = the embedding output or zero (`start`
["embedding"]); g learned or fixed (`learn_g` [True], init `g_init` [1.0]: the plain sum of the context's
contributions); noise (`noise`: ["train"] learned per-block h_t, drawn only in training; "always": at sampling
too, from the sampler's key; "off"), h_t's init `noise_init` [1e-4]. The U-Net side (the mix's a, b per layer or
global, identity at init) is the family's `unet.second_attention`; what trains is `train.freeze`
(configs/diff_adapter.py: the U-Net frozen, its new attentions and mixes trained).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.conditioners import Conditioning, context_valid
from lidit_jax.config_checks import fail, one_of, used_towers
from lidit_jax.models import layers

Dtype = Any

# conditioner.kind=diff_adapter: the open readings (module docstring)
CONFIG_DEFAULTS = {"conditioner": {"diff": dict(llm="llm", start="embedding", learn_g=True, g_init=1.0,
                                                noise="train", noise_init=1e-4)}}


class DiffAdapter(nn.Module):
  width: int
  llm: int  # the scores tower's index among the features
  start: str = "embedding"
  learn_g: bool = True
  g_init: float = 1.0
  noise: str = "train"
  noise_init: float = 1e-4
  drop_instruction: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], valids: Sequence[jax.Array], prompts: Sequence[jax.Array],
               t_emb_BD: jax.Array | None = None):
    f = feats[self.llm]
    if f.ndim != 4:
      raise ValueError("conditioner.kind='diff_adapter' reads per-block scores [B, L, blocks + 1, D]. Fix: "
                       "text.towers.NAME.output='scores' on its LLM tower")
    n = f.shape[2] - 1
    f = f.astype(jnp.float32)  # a sum over tens of blocks
    g = (self.param("block_scale", layers.logical(nn.initializers.constant(self.g_init), ("depth",)), (n,),
                    jnp.float32) if self.learn_g else jnp.full((n,), self.g_init, jnp.float32))
    code = jnp.einsum("bltd,t->bld", f[:, :, 1:], g)
    if self.start == "embedding":
      code = code + f[:, :, 0]
    if self.noise != "off":
      log_h = self.param("log_noise", layers.logical(nn.initializers.constant(math.log(self.noise_init)),
                                                     ("depth",)), (n,), jnp.float32)
      stream = "noise" if self.has_rng("noise") else (
          "sample_noise" if self.noise == "always" and self.has_rng("sample_noise") else None)
      if stream is not None:
        code = code + jnp.sqrt(2 * jnp.sum(jnp.exp(log_h))) * jax.random.normal(self.make_rng(stream), code.shape)
    code = layers.constrain(code.astype(self.dtype), ("batch", "length", "embed"))
    ctx = layers.Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="phi")(code)
    valid = context_valid(valids[self.llm:self.llm + 1], prompts[self.llm:self.llm + 1], self.drop_instruction)
    return Conditioning(ctx, valid, code=code, code_valid=valid)


def _index(text, name: str) -> int:
  return used_towers(text).index(name)


def build(d, text, width: int, dtype) -> DiffAdapter:
  return DiffAdapter(width, _index(text, d.llm), d.start, d.learn_g, d.g_init, d.noise, d.noise_init,
                     text.drop_instruction, dtype)


def flops_per_example(d, text, text_shapes: Sequence[tuple[int, ...]], width: int) -> int:
  """The weighted sum over blocks and phi (the towers' extra passes are the towers' count)."""
  length, blocks, dim = text_shapes[_index(text, d.llm)]
  return int(2 * length * blocks * dim + 2 * length * dim * width)


def validate(d, text, geometry) -> None:
  towers = used_towers(text)
  if d.llm not in towers:
    fail("conditioner.diff.llm", d.llm, f"is not a tower in text.use={','.join(towers)!r}",
         f"name one of {list(towers)} (an LLM tower with output='scores')")
  if list(towers) != [d.llm]:
    fail("text.use", ",".join(towers), f"the Diff Adapter reads one tower, {d.llm!r}; the others would run for "
         "nothing", f"--config.text.use={d.llm}")
  if text.towers[d.llm].output != "scores":
    fail(f"text.towers.{d.llm}.output", text.towers[d.llm].output, "the Diff Adapter reads per-block scores",
         "'scores'")
  one_of("conditioner.diff.start", d.start, ("embedding", "zero"))
  one_of("conditioner.diff.noise", d.noise, ("train", "always", "off"))
  if d.noise != "off" and not d.noise_init > 0:
    fail("conditioner.diff.noise_init", d.noise_init, "is the initial h_t (a variance) and must be > 0",
         "e.g. 1e-4, or conditioner.diff.noise='off'")
