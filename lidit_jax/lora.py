"""LoRA factors beside chosen kernels of any family: their layout and the kernels they make (issue 35's first step:
the math the trainer, the importer and the exporter will share).

Each pair lives in its kernel's PyTorch view (`torch_view`), as peft and kohya files hold it: A [r, in] and B
[out, r] for a Dense kernel; for a conv (LoCon) A [r, in, kh, kw] and B [out, r, 1, 1]. The model sees
W + (alpha / r) * from_torch(B @ A), so a file is read or written by renaming keys, whatever our kernel's layout (heads
split, scanned stacks: a leading `layers` axis gives every layer its own pair). B starts at zero: step 0 is the
base model.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from lidit_jax import torch_view


def name(path: tuple[str, ...]) -> str:
  return "/".join(path)


def targets(axis_names: dict, patterns) -> dict:
  """{path: logical names} of the kernels (rank >= 2) whose name ("denoiser/blocks/attn/q/kernel") matches one of
  the regexes. `axis_names`: {path: logical names} of the model's parameters (`export.model_axis_names`)."""
  return {p: n for p, n in axis_names.items()
          if p[-1] == "kernel" and len(n) >= 2 and any(re.search(rx, name(p)) for rx in patterns)}


def _layers(names) -> tuple[int, tuple]:
  """(1 or 0 leading stacked axes, the names of one layer's kernel)."""
  return (1, tuple(names[1:])) if names and names[0] == "layers" else (0, tuple(names))


def _torch_shape(names, shape) -> tuple[int, int, tuple[int, ...]]:
  """(out, in, spatial) of one layer's kernel in torch's view."""
  w = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.eval_shape(lambda k: torch_view.to_torch(names, k), w).shape
  return t[0], t[1], tuple(t[2:])


def init(rng, kernels: dict, shapes: dict, rank: int, conv_rank: int = 0) -> dict:
  """{name: {"A", "B"}} for the kernels of `targets` (`shapes`: {path: shape}); convs get `conv_rank` (0: none).
  A as peft draws it (Kaiming-uniform with a = sqrt(5): U(+-1 / sqrt(fan_in))), B zeros."""
  out = {}
  for i, (path, names) in enumerate(sorted(kernels.items())):
    stacked, one = _layers(names)
    layer_shape = shapes[path][stacked:]
    conv = torch_view.is_conv(one, len(layer_shape))
    r = conv_rank if conv else rank
    if r <= 0:
      continue
    o, n_in, spatial = _torch_shape(one, layer_shape)
    lead = shapes[path][:stacked]
    a_shape = (*lead, r, n_in, *spatial)
    bound = 1 / math.sqrt(n_in * math.prod(spatial))
    a = jax.random.uniform(jax.random.fold_in(rng, i), a_shape, jnp.float32, -bound, bound)
    b = jnp.zeros((*lead, o, r, *(1,) * len(spatial)), jnp.float32)
    out[name(path)] = {"A": a, "B": b}
  return out


def delta(names, shape, a, b, scale: float):
  """What the pair adds to a kernel of `shape` with logical `names`, in our layout."""
  stacked, one = _layers(names)
  if stacked:
    return jax.vmap(lambda a1, b1: delta(one, shape[1:], a1, b1, scale))(a, b)
  if torch_view.is_conv(one, len(shape)):
    weight = jnp.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
  else:
    weight = b @ a
  return torch_view.from_torch(one, scale * weight, shape)


def scale(alpha: float, rank: int) -> float:
  """peft's and kohya's scaling: alpha / r (alpha = r: 1)."""
  return alpha / rank


def merge(params, factors: dict, kernels: dict, alpha: float):
  """`params` with each factored kernel replaced by W + (alpha / r) B A, r the pair's own rank, in the kernel's
  dtype (jit-able: the trainer applies it on the fly, a sampler once)."""
  def one(path, w):
    path = tuple(k.key for k in path)
    f = factors.get(name(path))
    if f is None:
      return w
    names = kernels[path]
    r = f["A"].shape[_layers(names)[0]]  # A: [(layers,) r, in, ...]
    return (w + delta(names, w.shape, f["A"], f["B"], scale(alpha, r))).astype(w.dtype)
  return jax.tree_util.tree_map_with_path(one, params)
