"""LoRA factors beside chosen kernels of any family: their layout and the kernels they make (issue 35's first step:
the math the trainer, the importer and the exporter will share).

Each pair lives in its kernel's PyTorch view (`torch_view`), as peft and kohya files hold it: A [r, in] and B
[out, r] for a Dense kernel; for a conv (LoCon) A [r, in, kh, kw] and B [out, r, 1, 1]. The model sees
W + (alpha / r) * from_torch(B @ A), so a file is read or written by renaming keys, whatever our kernel's layout (heads
split, scanned stacks: a leading `layers` axis gives every layer its own pair). B starts at zero: step 0 is the
base model. The trainer holds the factors as a tree beside the parameters' (a kernel's path + "A" / "B") and
applies `merge` on the fly (`state.Setup.lora`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lidit_jax import torch_view
from lidit_jax.config_checks import fail


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


def factor_names(names) -> tuple[tuple, tuple]:
  """Logical names of a pair's A [r, in] and B [out, r] (sharded by the same rules as the kernel: `in` by the
  kernel's first input axis, `out` by its first output axis); a conv's pair is replicated."""
  stacked, one = _layers(names)
  lead = ("layers",) * stacked
  if torch_view.is_conv(one, len(one)):
    return (*lead, None, None, None, None), (*lead, None, None, None, None)
  return (*lead, None, one[0]), (*lead, one[torch_view.in_axes(one)], None)


def init(rng, kernels: dict, shapes: dict, rank: int, conv_rank: int = 0, boxed: bool = False) -> dict:
  """The factors of the kernels of `targets` (`shapes`: {path: shape}) as a tree beside the parameters': each
  kernel's path holds {"A", "B"}. Convs get `conv_rank` (0: none). A as peft draws it (Kaiming-uniform with
  a = sqrt(5): U(+-1 / sqrt(fan_in))), B zeros. `boxed`: with their logical axis names (for sharding)."""
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
    if boxed:
      a_names, b_names = factor_names(names)
      a, b = nn.LogicallyPartitioned(a, a_names), nn.LogicallyPartitioned(b, b_names)
    out[(*path, "A")], out[(*path, "B")] = a, b
  return traverse_util.unflatten_dict(out)


def pairs(factors) -> dict:
  """{kernel path: {"A", "B"}} of a factor tree."""
  flat = traverse_util.flatten_dict(factors)
  return {p[:-1]: {"A": flat[(*p[:-1], "A")], "B": flat[(*p[:-1], "B")]} for p in flat if p[-1] == "A"}


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
  """peft's and kohya's scaling: alpha / r; alpha = 0 stands for r (a scale of 1)."""
  return (alpha or rank) / rank


def merge(params, factors, kernels: dict, alpha: float, dropout: float = 0.0, rng=None):
  """`params` with each factored kernel replaced by W + (alpha / r) B A, r the pair's own rank, in the kernel's
  dtype (jit-able: the trainer applies it on the fly, a sampler once). With `rng` and `dropout`, A's input features
  are dropped (scaled by 1 / (1 - dropout)), one draw per kernel (per layer of a stack) and step: peft drops each
  token's input to A, which a merged kernel cannot; dropping the same features for every token of the step is the
  closest that keeps one kernel per step."""
  by_path = pairs(factors)

  def one(i, path, w):
    path = tuple(k.key for k in path)
    f = by_path.get(path)
    if f is None:
      return w
    names = kernels[path]
    stacked = _layers(names)[0]
    a = f["A"]  # [(layers,) r, in, ...]
    if rng is not None and dropout > 0:
      mask_shape = (*a.shape[:stacked], 1, a.shape[stacked + 1], *(1,) * (a.ndim - stacked - 2))
      keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - dropout, mask_shape)
      a = jnp.where(keep, a / (1.0 - dropout), 0.0)
    return (w + delta(names, w.shape, a, f["B"], scale(alpha, a.shape[stacked]))).astype(w.dtype)

  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  return treedef.unflatten([one(i, p, w) for i, (p, w) in enumerate(leaves)])


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A run's LoRA (the `lora` config section resolved against its model): which kernels carry a pair, and how
  they merge. The trainer's parameters are the factors; the model it applies is `merge(base, factors)`."""
  kernels: dict  # {path: logical names}
  rank: int
  conv_rank: int
  alpha: float
  dropout: float

  @classmethod
  def of(cls, section, axis_names: dict, default_targets) -> "Adapter | None":
    """None when `section.rank` is 0. A pattern that matches no kernel is refused by name (a typo trains
    nothing), as is a set of targets that gives no factor (convolutions only, without `conv_rank`)."""
    if not section.rank:
      return None
    patterns = tuple(section.targets) or tuple(default_targets)
    kernels = targets(axis_names, patterns)
    example = next((name(p) for p, n in axis_names.items() if p[-1] == "kernel" and len(n) >= 2), "denoiser/")
    for rx in patterns:
      if not targets(axis_names, [rx]):
        fail("lora.targets", rx, "matches no kernel of this model", f"use a regex over kernel names such as "
             f"{example!r}")
    convs = {p for p, n in kernels.items() if torch_view.is_conv(_layers(n)[1], len(_layers(n)[1]))}
    if not patterns or (not section.conv_rank and convs == set(kernels)):
      fail("lora.targets", patterns, "gives no kernel a pair", "name attention projections (e.g. "
           f"{example!r}), or set lora.conv_rank for convolutions")
    return cls(kernels, int(section.rank), int(section.conv_rank), float(section.alpha), float(section.dropout))

  def init(self, rng, shapes: dict, boxed: bool = False):
    return init(rng, self.kernels, shapes, self.rank, self.conv_rank, boxed)

  def merge(self, params, factors, rng=None):
    return merge(params, factors, self.kernels, self.alpha, self.dropout, rng)


# ---- files: a pair per module, "{module}.lora_A.weight" [r, in(, kh, kw)] / "{module}.lora_B.weight" [out, r(, 1, 1)]
# as peft's state dicts and diffusers' `save_lora_weights` name them, the module named as `export safetensors` names
# the kernel's weight (`torch_view.module_key`: a stack's layers numbered). The scale alpha / r: peft's adapter
# metadata (`lora_adapter_metadata`: {"r", "lora_alpha", "rank_pattern", "alpha_pattern"}, as diffusers writes
# it) or kohya's per-module "{module}.alpha"; neither: alpha = r.
METADATA = "lora_adapter_metadata"


def to_file(factors, kernels: dict, alpha: float, module_key=torch_view.module_key) -> tuple[dict, dict]:
  """({key: array}, metadata) of a run's factors in the layout above (a stack's pairs one per layer); `module_key`
  (path, layer) -> name (a family's own: the U-Net's diffusers names, `denoisers.lora_module_key`)."""
  tensors, ranks = {}, {}
  for path, f in sorted(pairs(factors).items()):
    stacked = _layers(kernels[path])[0]
    layers = range(f["A"].shape[0]) if stacked else [None]
    for i in layers:
      key = module_key(path, i)
      tensors[f"{key}.lora_A.weight"] = np.asarray(f["A"] if i is None else f["A"][i], np.float32)
      tensors[f"{key}.lora_B.weight"] = np.asarray(f["B"] if i is None else f["B"][i], np.float32)
      ranks[key] = tensors[f"{key}.lora_A.weight"].shape[0]
  r = max(ranks.values(), default=0, key=list(ranks.values()).count)  # the most common rank
  meta = {"r": r, "lora_alpha": alpha or r,
          "rank_pattern": {k: v for k, v in ranks.items() if v != r},
          "alpha_pattern": {k: alpha or v for k, v in ranks.items() if (alpha or v) != (alpha or r)}}
  return tensors, {METADATA: json.dumps(meta)}


def from_file(tensors: dict, metadata: dict | None, kernels: dict, shapes: dict, scale: float = 1.0,
              module_key=torch_view.module_key):
  """(factors, kernels they pair with) that `merge(params, factors, kernels, alpha=0)` applies as the file's LoRA
  times `scale`: alpha / r folded into B, a stack's layers (the file's per layer) gathered with zeros for layers
  the file leaves out (and ranks padded with zero rows: the same product). `kernels`: {path: logical names} of
  every kernel of the model. A key naming no kernel, or a pair of the wrong shape, is a ValueError by name."""
  meta = json.loads((metadata or {}).get(METADATA, "{}"))
  by_module = {}
  for key in tensors:
    module, _, rest = key.rpartition(".lora_")
    if rest in ("A.weight", "B.weight"):
      by_module.setdefault(module, {})[rest[0]] = np.asarray(tensors[key], np.float32)
  where = {}  # module key -> (kernel path, layer or None)
  for path, names in kernels.items():
    stacked = _layers(names)[0]
    for i in (range(shapes[path][0]) if stacked else [None]):
      where[module_key(path, i)] = (path, i)
  alphas = {k[:-len(".alpha")]: float(np.asarray(v)) for k, v in tensors.items() if k.endswith(".alpha")}
  unused = sorted(set(tensors) - {f"{m}.lora_{x}.weight" for m in by_module if m in where for x in "AB"}
                  - {f"{m}.alpha" for m in alphas if m in by_module and m in where})
  if unused:
    raise ValueError(f"lora: {len(unused)} key(s) of the file pair with no kernel of this model, the first "
                     f"{unused[:5]}. Fix: load a LoRA made for this model (its keys name modules such as "
                     f"{next(iter(where), '?')!r})")
  scaled = {}  # kernel path -> {layer: (A, B * alpha / r * scale)}
  for module, ab in by_module.items():
    if set(ab) != {"A", "B"}:
      raise ValueError(f"lora: {module} has lora_{next(iter(ab))} without its partner. Fix: use a complete file")
    path, layer = where[module]
    stacked, one = _layers(kernels[path])
    o, n_in, spatial = _torch_shape(one, shapes[path][stacked:])
    r = ab["A"].shape[0]
    want = {"A": (r, n_in, *spatial), "B": (o, r, *(1,) * len(spatial))}
    for x in "AB":
      if ab[x].shape != want[x]:
        raise ValueError(f"lora: {module}.lora_{x}.weight has shape {ab[x].shape}, this model's {'/'.join(path)} "
                         f"needs {want[x]}: the LoRA was made for another model. Fix: load one made for this model")
    alpha = alphas.get(module, meta.get("alpha_pattern", {}).get(module, meta.get("lora_alpha", r)))
    scaled.setdefault(path, {})[layer] = (ab["A"], ab["B"] * (alpha / r * scale))
  factors = {}
  for path, layers in scaled.items():
    r = max(a.shape[0] for a, _ in layers.values())
    pad = lambda a, b: (np.pad(a, [(0, r - a.shape[0])] + [(0, 0)] * (a.ndim - 1)),
                        np.pad(b, [(0, 0), (0, r - b.shape[1])] + [(0, 0)] * (b.ndim - 2)))
    if None in layers:
      a, b = pad(*layers[None])
    else:
      a0, b0 = pad(*next(iter(layers.values())))
      stack = [pad(*layers[i]) if i in layers else (np.zeros_like(a0), np.zeros_like(b0))
               for i in range(shapes[path][0])]
      a, b = np.stack([x for x, _ in stack]), np.stack([y for _, y in stack])
    factors[(*path, "A")], factors[(*path, "B")] = a, b
  return traverse_util.unflatten_dict(factors), {p: kernels[p] for p in scaled}


def validate(section) -> None:
  """The `lora` section's own checks (configs.validate)."""
  for key in ("rank", "conv_rank"):
    if isinstance(section[key], bool) or not isinstance(section[key], int) or section[key] < 0:
      fail(f"lora.{key}", section[key], "must be a whole number >= 0", "use 0 (off) or a rank such as 16")
  if section.conv_rank and not section.rank:
    fail("lora.conv_rank", section.conv_rank, "needs lora.rank > 0 (LoRA is on when rank is)",
         "set --config.lora.rank too")
  if section.alpha < 0:
    fail("lora.alpha", section.alpha, "must be >= 0", "use 0 (alpha = rank: a scale of 1) or e.g. the rank")
  if not 0.0 <= section.dropout < 1.0:
    fail("lora.dropout", section.dropout, "must be in [0, 1)", "use 0 or e.g. 0.1")
  for rx in section.targets:
    try:
      re.compile(rx)
    except re.error as e:
      fail("lora.targets", rx, f"is not a regular expression ({e})", "fix the pattern, e.g. 'attn'")
  if section.targets and not section.rank:
    fail("lora.targets", tuple(section.targets), "are set but lora.rank is 0 (LoRA off)", "set --config.lora.rank")
