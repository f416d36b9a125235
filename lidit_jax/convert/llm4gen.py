"""LLM4GEN's released Cross-Adapter Module (`projector.pth`, a pickled state dict, or a safetensors file with the
same keys) -> `models.adapters.CrossAdapter` and its parameters.

Keys (PAPERS.md section 4): `CrossFusionModule.{i}.{llm_proj,q_proj,k_proj,v_proj,out_proj}.{weight,bias}`,
`CrossFusionModule.{i}.{q_norm,kv_norm,norm}.{weight,bias}`, `CrossFusionModule.{i}.FFN.{0,2}.{weight,bias}`; the
widths come from the shapes, the head count (not in the weights: released 8) is an argument. The release has one
block whose `llm_proj` maps the LLM's width to CLIP's; a later block's own `llm_proj` would need the CLIP width in
and is refused rather than guessed.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp

from lidit_jax.cli import NotFound, UserError
from lidit_jax.convert import safetensors_io as io
from lidit_jax.convert.registry import strip_boxes
from lidit_jax.models import adapters

PREFIX = "CrossFusionModule."


def plan(num_blocks: int, num_heads: int) -> dict:
  p = {("llm_proj", "kernel"): io.Source.one(f"{PREFIX}0.llm_proj.weight", io.linear),
       ("llm_proj", "bias"): io.Source.one(f"{PREFIX}0.llm_proj.bias")}
  for i in range(num_blocks):
    b, k = f"block_{i}", f"{PREFIX}{i}."
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      p[(b, "attn", ours, "kernel")] = io.Source.one(k + f"{theirs}.weight", io.heads_in(num_heads))
      p[(b, "attn", ours, "bias")] = io.Source.one(k + f"{theirs}.bias", io.heads_bias(num_heads))
    p[(b, "attn", "out", "kernel")] = io.Source.one(k + "out_proj.weight", io.heads_out(num_heads))
    p[(b, "attn", "out", "bias")] = io.Source.one(k + "out_proj.bias")
    for norm in ("q_norm", "kv_norm", "norm"):
      p[(b, norm, "scale")] = io.Source.one(k + f"{norm}.weight")
      p[(b, norm, "bias")] = io.Source.one(k + f"{norm}.bias")
    for ours, theirs in (("fc1", "FFN.0"), ("fc2", "FFN.2")):
      p[(b, ours, "kernel")] = io.Source.one(k + f"{theirs}.weight", io.linear)
      p[(b, ours, "bias")] = io.Source.one(k + f"{theirs}.bias")
  return p


def load_llm4gen_cam(path: str, dtype=jnp.float32, allow_pickle: bool = False, num_heads: int = 8, lam: float = 1.0,
                     llm_first: bool = False):
  """(CrossAdapter module, params) of LLM4GEN's released CAM: `cam.apply({"params": params}, clip_BLD, llm_BMD)`
  gives the fused context [B, L + M, D] as the released module computes it. `path`: `projector.pth` (a pickle,
  refused unless `allow_pickle=True`, then read with torch's weights-only mode) or a .safetensors file; a key prefix
  in front of `CrossFusionModule.` (a wrapped state dict) is found and stripped."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise NotFound(f"LLM4GEN CAM weights {path!r} do not exist. Fix: point at projector.pth or its safetensors copy")
  if not path.endswith(".safetensors") and not allow_pickle:
    raise UserError(f"{path} is a pickle, which can run code when loaded. Fix: pass allow_pickle=True (read with "
                    "torch's weights-only mode) or convert it to safetensors")
  files = io.CheckpointFiles(path, allow_pickle=allow_pickle)
  files.find_prefix([f"{PREFIX}0.llm_proj.weight"])
  keys = [k[len(files.prefix):] for k in files.keys()]
  blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(PREFIX)}(\d+)\.", k))})
  if blocks != list(range(len(blocks))) or any(f"{PREFIX}{i}.llm_proj.weight" in keys for i in blocks[1:]):
    raise UserError(f"{path}: blocks {blocks} are not the release's layout (CrossFusionModule.0, 1, ... with one "
                    "llm_proj in block 0). Fix: use LLM4GEN's projector.pth")
  llm_dim = files.shape(files.resolve(f"{PREFIX}0.llm_proj.weight"))[1]
  dim = files.shape(files.resolve(f"{PREFIX}0.llm_proj.weight"))[0]
  hidden = files.shape(files.resolve(f"{PREFIX}0.FFN.0.weight"))[0]
  if hidden % dim or dim % num_heads:
    raise UserError(f"{path}: FFN width {hidden} / CLIP width {dim} / num_heads {num_heads} do not divide. Fix: "
                    "check num_heads (released: 8)")
  module = adapters.CrossAdapter(len(blocks), num_heads, hidden // dim, lam, llm_first, dtype)
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1, dim)), jnp.zeros((1, 1, llm_dim)))
  expected = io.flatten_shapes(strip_boxes(abstract["params"]))
  p = plan(len(blocks), num_heads)
  resolved = io.check_plan(p, files, expected)
  params = io.build_params(p, files, expected, dtype, resolved=resolved)
  unused = sorted(set(files.keys()) - {k for names in resolved.values() for k in names})
  if unused:
    raise UserError(f"{path}: {len(unused)} tensors match no CAM parameter: {unused[:8]}. Fix: use LLM4GEN's "
                    "projector.pth (20 tensors for its one block)")
  return module, params
