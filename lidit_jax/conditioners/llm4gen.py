"""LLM4GEN's Cross-Adapter Module as a conditioner (`conditioner.kind=llm4gen`, options in `conditioner.cam`):
the LLM tower's features, projected to the CLIP width, attend to the frozen CLIP tower's; the context is the CLIP
tokens followed by the refined LLM tokens (`models/adapters.CrossAdapter`; facts: PAPERS.md section 4).

`cam.clip` / `cam.llm` name the two towers (in `text.use`). The released module's options are the defaults: one
block, 8 heads, no lambda (1.0), CLIP first, no mask on padded LLM tokens (`cam.mask_llm=True` marks them invalid
in the context instead). `cam.init`: LLM4GEN's `projector.pth` or a safetensors copy (a pickle only with
`cam.allow_pickle=True`), loaded into `conditioner/cam/` when a run starts (`pretrained_weights`). The backbone
reads the CLIP width; another width (a DiT's) gets a learned projection (`out_proj`) after the CAM.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.config_checks import ConfigError, fail, used_towers
from lidit_jax.convert import load_llm4gen_cam
from lidit_jax.models import adapters, layers

Dtype = Any

# conditioner.kind=llm4gen: the towers standing for CLIP and the LLM, and the released module's values
# LoRA by default: the Cross-Adapter Module's attention projections
LORA_TARGETS = (r"^conditioner/cam/.*/attn/(query|key|value|out)/kernel$",)
CONFIG_DEFAULTS = {"conditioner": {"cam": dict(clip="clip", llm="t5", num_blocks=1, num_heads=8, lam=1.0,
                                               llm_first=False, mask_llm=False, init="", allow_pickle=False)}}


class CAM(nn.Module):
  width: int
  clip: int  # the CLIP tower's index among the features
  llm: int
  num_blocks: int = 1
  num_heads: int = 8
  lam: float = 1.0
  llm_first: bool = False
  mask_llm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], valids: Sequence[jax.Array], prompts: Sequence[jax.Array],
               t_emb_BD: jax.Array | None = None):
    clip, llm = feats[self.clip], feats[self.llm]
    if clip.ndim != 3 or llm.ndim != 3:
      raise ValueError("conditioner.kind='llm4gen' reads one hidden state per tower. Fix: all_layers=False")
    ctx = adapters.CrossAdapter(self.num_blocks, self.num_heads, lam=self.lam, llm_first=self.llm_first,
                                dtype=self.dtype, name="cam")(clip, llm)
    if ctx.shape[-1] != self.width:  # a backbone of another width (a DiT) reads it through a projection
      ctx = layers.Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="out_proj")(ctx)
    clip_valid = valids[self.clip].astype(bool)
    llm_valid = valids[self.llm].astype(bool) if self.mask_llm else jnp.ones(llm.shape[:2], bool)
    parts = (llm_valid, clip_valid) if self.llm_first else (clip_valid, llm_valid)
    return ctx, jnp.concatenate(parts, axis=1)


def _index(text, name: str) -> int:
  return used_towers(text).index(name)


def build(cam, text, width: int, dtype) -> CAM:
  return CAM(width, _index(text, cam.clip), _index(text, cam.llm), cam.num_blocks, cam.num_heads, cam.lam, cam.llm_first,
             cam.mask_llm, dtype)


def flops_per_example(cam, text, text_shapes: Sequence[tuple[int, ...]], width: int) -> int:
  """llm_proj, per block q / k / v / out (4 D^2 on their tokens) + attention (2 M L D x 2) + FFN (2 x 4 D^2 x 2);
  the output projection when the width differs."""
  clip, llm = text_shapes[_index(text, cam.clip)], text_shapes[_index(text, cam.llm)]
  (l, d), (m, dl) = (clip[0], clip[-1]), (llm[0], llm[-1])
  per_block = 2 * (2 * m * d * d + 2 * l * d * d) + 4 * m * l * d + 2 * m * 8 * d * d
  out = 2 * (l + m) * d * width if d != width else 0
  return int(2 * m * dl * d + cam.num_blocks * per_block + out)


def validate(cam, text, geometry) -> None:
  towers = used_towers(text)
  for key in ("clip", "llm"):
    if cam[key] not in towers:
      fail(f"conditioner.cam.{key}", cam[key], f"is not a tower in text.use={','.join(towers)!r}",
           f"name one of {towers} (the CAM reads a CLIP tower and an LLM tower)")
  if cam.clip == cam.llm:
    fail("conditioner.cam.llm", cam.llm, "is the CLIP tower too", "name two different towers")
  if cam.num_blocks < 1 or cam.num_heads < 1:
    fail("conditioner.cam.num_blocks/num_heads", (cam.num_blocks, cam.num_heads), "must be >= 1", "released: 1 and 8")


def pretrained_weights(cam) -> dict:
  """{"conditioner/cam/...": array} of `conditioner.cam.init` (LLM4GEN's released projector), or {}."""
  if not cam.init:
    return {}
  module, params = load_llm4gen_cam(cam.init, allow_pickle=cam.allow_pickle, num_heads=cam.num_heads)
  if module.num_blocks != cam.num_blocks:
    raise ConfigError(f"conditioner.cam.init={cam.init!r} holds {module.num_blocks} block(s), the config "
                      f"conditioner.cam.num_blocks={cam.num_blocks}. Fix: --config.conditioner.cam.num_blocks="
                      f"{module.num_blocks}")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"conditioner/cam/" + "/".join(k.key for k in p): v for p, v in flat}
