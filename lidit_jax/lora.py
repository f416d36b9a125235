"""LoRA on any family: the `lora` config section, the factors beside chosen kernels and the kernels they make (the
trainer's, `Pipeline.load_lora`'s and the exporter's), and LoRA files in diffusers' / peft's, kohya's and LyCORIS'
layouts (docs/lora.md).

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
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lidit_jax import torch_view
from lidit_jax.cli import UserError
from lidit_jax.config_checks import fail
from lidit_jax.convert import safetensors_io


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


def shapes_of(params) -> dict:
  """{path: shape} of a parameter tree (arrays or ShapeDtypeStructs, unboxed)."""
  return {p: a.shape for p, a in safetensors_io.flatten_shapes(params).items()}


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

  def init(self, rng, params, boxed: bool = False):
    """Fresh factors for the model's `params` (arrays or their shapes)."""
    return init(rng, self.kernels, shapes_of(params), self.rank, self.conv_rank, boxed)

  def merge(self, params, factors, rng=None):
    return merge(params, factors, self.kernels, self.alpha, self.dropout, rng)


# ---- files. Two layouts, a pair per module:
#   diffusers / peft: "{module}.lora_A.weight" [r, in(, kh, kw)], "{module}.lora_B.weight" [out, r(, 1, 1)], the
#     scale in peft's LoraConfig in the metadata (`lora_adapter_metadata`, its fields prefixed by the component as
#     diffusers' `save_lora_weights` packs them: "unet.lora_alpha", "unet.alpha_pattern"; or bare, as peft saves one
#     model); without it alpha = r;
#   kohya / A1111: "lora_{module with . -> _}.lora_down.weight" (A), ".lora_up.weight" (B), ".alpha" (a scalar).
# A module is named as `export safetensors` names the kernel's weight (`torch_view.module_key`: a stack's layers
# numbered) or as its family names it (`denoisers.lora_names`: the U-Net's diffusers / original / ComfyUI names);
# reading accepts every name the family gives, in either layout.
METADATA = "lora_adapter_metadata"
FORMATS = ("diffusers", "kohya")
_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_down.weight": "A", "lora_up.weight": "B"}


def kohya_name(module: str) -> str:
  return "lora_" + module.replace(".", "_")


def _matches(pattern: str, module: str) -> bool:
  """peft's rank_pattern / alpha_pattern rule: the key names the module or a dotted suffix of it (a regex)."""
  return re.match(rf"(.*\.)?({pattern})$", module) is not None


def _config_of(meta: dict, module: str) -> tuple[dict, str]:
  """(the LoraConfig fields that apply to `module`, its name relative to them)."""
  prefix, _, rest = module.partition(".")
  fields = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}
  return (fields, rest) if fields else (meta, module)


def default_names(path, layer=None) -> list[str]:
  """A kernel's module name where its family gives none: `export safetensors`' (`torch_view.module_key`)."""
  return [torch_view.module_key(path, layer)]


def to_file(factors, kernels: dict, alpha: float, names=default_names, fmt: str = "diffusers"):
  """({key: array}, metadata) of a run's factors in layout `fmt` (a stack's pairs one per layer); `names`: the
  family's (`denoisers.lora_names`), the first of which is written."""
  tensors, ranks = {}, {}
  for path, f in sorted(pairs(factors).items()):
    stacked = _layers(kernels[path])[0]
    for i in (range(f["A"].shape[0]) if stacked else [None]):
      module = names(path, i)[0]
      a, b = (np.asarray(f[x] if i is None else f[x][i], np.float32) for x in "AB")
      ranks[module] = a.shape[0]
      if fmt == "kohya":
        key = kohya_name(module)
        tensors.update({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b,
                        f"{key}.alpha": np.asarray(alpha or a.shape[0], np.float32)})
      else:
        tensors.update({f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b})
  if fmt == "kohya":
    return tensors, {}
  meta = {}  # one LoraConfig per component ("unet", "denoiser", "conditioner"), as diffusers packs them
  for prefix in sorted({k.partition(".")[0] for k in ranks}):
    mine = {k.partition(".")[2]: v for k, v in ranks.items() if k.startswith(prefix + ".")}
    r = max(mine.values(), key=list(mine.values()).count)  # the most common rank
    fields = {"r": r, "lora_alpha": alpha or r, "target_modules": sorted(mine),
              "rank_pattern": {k: v for k, v in mine.items() if v != r},
              "alpha_pattern": {k: alpha or v for k, v in mine.items() if (alpha or v) != (alpha or r)}}
    meta.update({f"{prefix}.{k}": v for k, v in fields.items()})
  return tensors, {METADATA: json.dumps(meta)}


_LYCORIS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
            "lokr_w2_a", "lokr_w2_b")


def _split(key: str) -> tuple[str, str | None]:
  """(module, part) of a LoRA file's key: part "A" / "B" (peft's lora_A / lora_B, kohya's lora_down / lora_up),
  "alpha", a LyCORIS factor's name (LoHa's hada_*, LoKr's lokr_*), or None (not a LoRA key)."""
  module, _, suffix = key.partition(".lora_")
  if suffix and "lora_" + suffix in _SUFFIXES:
    return module, _SUFFIXES["lora_" + suffix]
  module, _, last = key.rpartition(".")
  return (module, last) if last == "alpha" or last in _LYCORIS else (key, None)


def _delta_of(parts: dict, alpha, module: str) -> tuple[np.ndarray, float]:
  """(the weight a LyCORIS module adds, in torch's layout, before `scale`; its alpha / r scale, as LyCORIS applies
  it): LoHa (w1_a w1_b) * (w2_a w2_b), alpha / r; LoKr kron(w1, w2), each factor whole or w_a w_b, alpha / r only
  when a factor is decomposed (r: its rank)."""
  f = {k: np.asarray(v[1], np.float32) for k, v in parts.items()}
  if "hada_w1_a" in f:
    missing = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - set(f)
    if missing:
      raise ValueError(f"lora: {module} (LoHa) has no {sorted(missing)[0]}. Fix: use a complete file")
    r = f["hada_w1_b"].shape[0]
    return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]), (alpha or r) / r
  w = {}
  for n in ("w1", "w2"):
    if f"lokr_{n}" in f:
      w[n] = f[f"lokr_{n}"]
    elif f"lokr_{n}_a" in f and f"lokr_{n}_b" in f:
      w[n] = f[f"lokr_{n}_a"] @ f[f"lokr_{n}_b"]
    else:
      raise ValueError(f"lora: {module} (LoKr) has no lokr_{n} (nor lokr_{n}_a and _b). Fix: use a complete file")
  rank = next((f[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in f), None)
  w1 = w["w1"].reshape(*w["w1"].shape, *(1,) * (w["w2"].ndim - 2))
  return np.kron(w1, w["w2"]), (alpha / rank if rank and alpha else 1.0)


def read(tensors: dict, metadata: dict | None, where: dict, scale: float = 1.0) -> dict:
  """{slot: (A, B * alpha / r * scale)} of a LoRA file. `where`: {module name: [(slot, torch shape (out, in,
  *spatial), what it is, for messages), ...]} of every module a file may name (a module may land in several slots:
  one text encoder read by two towers); its kohya form is added here. LyCORIS' LoHa and LoKr modules (closed forms
  over the same weight) come as their whole added weight: A = that weight, B = the identity. A key naming no
  module, a factor without its partners or of the wrong shape is a ValueError by name."""
  meta = json.loads((metadata or {}).get(METADATA, "{}"))
  canonical = {**{m: m for m in where}, **{kohya_name(m): m for m in where}}  # a file's name -> peft's
  found, used, alphas = {}, set(), {}
  for key, value in tensors.items():
    module, part = _split(key)
    if module in canonical and part is not None:
      used.add(key)
      if part == "alpha":
        alphas[canonical[module]] = float(np.asarray(value))
      else:
        found.setdefault(canonical[module], {})[part] = (key, value)
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"lora: {len(unused)} key(s) of the file pair with no kernel of this model, the first "
                     f"{unused[:5]}. Fix: load a LoRA made for this model (its keys name modules such as "
                     f"{next(iter(where), '?')!r})")
  out = {}
  for module, ab in found.items():
    if set(ab) & set(_LYCORIS):
      delta, factor = _delta_of(ab, alphas.get(module), module)
      for slot, (o, n_in, *spatial), what in where[module]:
        if delta.size != o * n_in * math.prod(spatial):
          raise ValueError(f"lora: {module} adds a weight of {delta.shape}, this model's {what} is "
                           f"{(o, n_in, *spatial)}: the LoRA was made for another model. Fix: load one made for it")
        b = np.eye(o, dtype=np.float32).reshape(o, o, *(1,) * len(spatial))
        out[slot] = (delta.reshape(o, n_in, *spatial), b * (factor * scale))
      continue
    if set(ab) != {"A", "B"}:
      raise ValueError(f"lora: {next(iter(ab.values()))[0]} has no partner (A and B). Fix: use a complete file")
    a, b = (np.asarray(ab[x][1], np.float32) for x in "AB")
    r = a.shape[0]
    if module in alphas:  # kohya's
      alpha = alphas[module]
    else:
      fields, name_there = _config_of(meta, module)
      alpha = next((float(v) for k, v in (fields.get("alpha_pattern") or {}).items() if _matches(k, name_there)),
                   float(fields.get("lora_alpha") or r))
    for slot, (o, n_in, *spatial), what in where[module]:
      for x, value, want in (("A", a, (r, n_in, *spatial)), ("B", b, (o, r, *(1,) * len(spatial)))):
        if value.shape != want:
          raise ValueError(f"lora: {ab[x][0]} has shape {value.shape}, this model's {what} needs {want}: the LoRA "
                           "was made for another model. Fix: load one made for this model")
      out[slot] = (a, b * (alpha / r * scale))
  return out


def model_slots(kernels: dict, shapes: dict, names=default_names) -> dict:
  """`read`'s `where` for a model's kernels ({path: logical names}, {path: shape}): slot (path, layer)."""
  where = {}
  for path, logical in kernels.items():
    stacked, one = _layers(logical)
    torch_shape = _torch_shape(one, shapes[path][stacked:])
    for i in (range(shapes[path][0]) if stacked else [None]):
      for module in names(path, i):
        where.setdefault(module, []).append(((path, i), (torch_shape[0], torch_shape[1], *torch_shape[2]),
                                             "/".join(path)))
  return where


def as_factors(pairs_read: dict, kernels: dict, shapes: dict):
  """(factors, the kernels they pair with) that `merge(params, factors, kernels, alpha=0)` applies: a stack's layers
  (a file's are per layer) gathered with zeros for the layers a file leaves out, ranks padded with zero rows (the
  same product)."""
  by_path = {}
  for (path, layer), ab in pairs_read.items():
    by_path.setdefault(path, {})[layer] = ab
  factors = {}
  for path, layers in by_path.items():
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
  return traverse_util.unflatten_dict(factors), {p: kernels[p] for p in by_path}


def tower_slots(name: str, plan: dict, shapes: dict, prefixes) -> dict:
  """`read`'s `where` for a frozen text tower's Dense kernels, named by its converter `plan` (the Hugging Face key
  of each layer's weight: `encoder.layers.0.self_attn.q_proj`, also under `text_model.`) after each of `prefixes`
  (`text_encoder`, kohya's `te1`): slot (name, path, layer)."""
  where = {}
  for path, src in plan.items():
    if path[-1] != "kernel" or not hasattr(src.transform, "inverse"):
      continue
    one = shapes[path][1:] if src.stacked else shapes[path]
    o, n_in = jax.eval_shape(src.transform.inverse, jax.ShapeDtypeStruct(one, jnp.float32)).shape  # nothing made
    for i, key in enumerate(src.keys):
      module = key.removesuffix(".weight")
      for prefix in prefixes:
        for full in (module, f"text_model.{module}"):
          where.setdefault(f"{prefix}.{full}", []).append(((name, path, i if src.stacked else None), (o, n_in),
                                                           f"{name}: {key}"))
  return where


def merge_tower(params, pairs_read: dict, plan: dict):
  """A frozen tower's `params` with `read`'s pairs of its slots added to its kernels: the converter's transform of
  B @ A (it maps a PyTorch weight into our kernel, linearly), in each kernel's dtype."""
  shapes, deltas = shapes_of(params), {}
  for (_, path, layer), (a, b) in pairs_read.items():
    d = plan[path].transform(b @ a)
    if layer is None:
      deltas[path] = deltas.get(path, 0) + d
    else:
      deltas.setdefault(path, np.zeros(shapes[path], np.float32))[layer] += d
  return jax.tree_util.tree_map_with_path(
      lambda p, w: (w + deltas[tuple(k.key for k in p)]).astype(w.dtype) if tuple(k.key for k in p) in deltas else w,
      params)


def parse_arg(value: str, what: str = "--lora") -> tuple[str, float]:
  """A command line's PATH[:SCALE] -> (path, scale); a missing file or a bad scale refused by name."""
  path, _, scale = value.rpartition(":") if re.fullmatch(r".*:[-+0-9.eE]+", value) else (value, "", "1")
  if not os.path.isfile(path):
    raise UserError(f"{what} {value!r}: no such file {path!r}. Fix: pass a LoRA .safetensors file, optionally "
                    "with :SCALE (e.g. style.safetensors:0.8)")
  try:
    return path, float(scale)
  except ValueError:
    raise UserError(f"{what} {value!r}: the scale {scale!r} is not a number. Fix: e.g. style.safetensors:0.8")


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
