"""Loop trip counts for a compiled program's cost: XLA's cost analysis counts a while loop's body once, so a model
whose blocks run under `nn.scan` (every large config here) reports a fraction of its FLOPs. This reads the compiled
(per-chip) HLO text: each computation's matmul FLOPs (convolutions and dots; TPU lowers dots to convolutions) and
HBM bytes (operands + result of each top-level instruction, as XLA counts a fusion), how often it runs (a while
body its loop's trip count, read from the condition's `counter < N`), and so the extra cost of the loops' repeats,
which `tpu_compile.cost` adds to the compiler's own totals.
"""
from __future__ import annotations

import collections
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\) -> .*\{\s*$")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?)\s([a-z][\w\-]*)\((.*)$")
ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")
# No HBM traffic of their own (aliases, control, loop plumbing) or counted inside the computations they call.
NO_BYTES = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "while", "call", "conditional",
            "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency"}


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in ARRAY.findall(type_text)
          if dt in DTYPE_BYTES]


def nbytes(type_text: str) -> int:
  return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in arrays(type_text))


def split_call(rest: str) -> tuple[str, str]:
  """`a, b), attr=...` -> (`a, b`, `attr=...`): the operand list up to its closing parenthesis."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[:i], rest[i + 1:]
  return rest, ""


def parse(hlo_text: str) -> tuple[dict, str | None]:
  """{computation: [(name, type, op, operand names, attributes, operand text)]}, and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    head = HEADER.match(line)
    if head:
      current = comps.setdefault(head.group(2), [])
      entry = head.group(2) if head.group(1) else entry
      continue
    if line.rstrip() == "}":  # a computation's end (a Mosaic kernel's attributes span lines that start with "}}")
      current = None
      continue
    m = INSTRUCTION.match(line) if current is not None else None
    if m:
      operands, attrs = split_call(m.group(4))
      current.append((m.group(1), m.group(2), m.group(3), re.findall(r"%([\w.\-]+)", operands), attrs, operands))
  return comps, entry


def window_positions(size: int, kernel: int, out: int, stride: int, pad_lo: int, lhs_dilate: int,
                     rhs_dilate: int) -> int:
  """Kernel taps that land on a real (not padding, not dilation-hole) input element, over all outputs of one
  spatial dimension (XLA's count: a batched matmul lowered as a padded convolution does no work in its pads)."""
  taps = 0
  for o in range(out):
    for k in range(kernel):
      pos = o * stride + k * rhs_dilate - pad_lo
      taps += pos >= 0 and pos % lhs_dilate == 0 and pos // lhs_dilate < size
  return taps


def conv_flops(out_type: str, lhs_type: str, rhs_type: str, attrs: str) -> int:
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
  if not labels or not arrays(out_type) or not arrays(lhs_type) or not arrays(rhs_type):
    return 0
  lhs_l, rhs_l, out_l = labels.groups()
  out, lhs, rhs = arrays(out_type)[0][1], arrays(lhs_type)[0][1], arrays(rhs_type)[0][1]
  window = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(re.findall(r"(\w+)=([\w\-x]+)", window.group(1))) if window else {}
  per_dim = lambda key, default, n: [int(v) for v in fields[key].split("x")] if key in fields else [default] * n
  spatial = [c for c in lhs_l if c.isdigit()]
  n = len(spatial)
  strides, lhs_dil, rhs_dil = per_dim("stride", 1, n), per_dim("lhs_dilate", 1, n), per_dim("rhs_dilate", 1, n)
  pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * n
  taps = 1
  for i, d in enumerate(spatial):
    taps *= window_positions(lhs[lhs_l.index(d)], rhs[rhs_l.index(d)], out[out_l.index(d)], strides[i], pads[i],
                             lhs_dil[i], rhs_dil[i])
  return 2 * out[out_l.index("b")] * out[out_l.index("f")] * taps * rhs[rhs_l.index("i")]


def dot_flops(out_type: str, lhs_type: str, attrs: str) -> int:
  """A dot's, or a cuBLAS matmul's (the GPU compiler's custom call: its dimensions in the backend config)."""
  contracting = (re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
                 or re.search(r'"lhs_contracting_dimensions":\[([\d",]*)\]', attrs))
  if not contracting or not arrays(out_type) or not arrays(lhs_type):
    return 0
  lhs = arrays(lhs_type)[0][1]
  k = math.prod(lhs[int(i)] for i in contracting.group(1).replace('"', "").split(",") if i)
  return 2 * math.prod(arrays(out_type)[0][1]) * k


# Pallas splash attention's Mosaic kernels are custom calls the cost model cannot see into: their FLOPs from q
# [(B,) H, T, D] and k [(B,) H, S, D] (B: the batch `jax.vmap` adds over the kernel), 2 B H T S D per matmul: the
# forward QK^T and PV; dq recomputes QK^T and takes dO V^T and dS K; dkv recomputes QK^T and takes P^T dO, dO V^T
# and dS^T Q (full masks: every block computed).
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def splash_flops(name: str, operand_types: list) -> int:
  kernel = re.match(r"splash_mha_(fwd|dq|dkv)", name)
  shapes = [dims for t in operand_types for dt, dims in [*arrays(t)][:1]
            if len(arrays(t)) == 1 and len(dims) in (3, 4) and dt.startswith(("f", "bf"))]
  if not kernel or len(shapes) < 2 or len(shapes[0]) != len(shapes[1]):
    return 0
  (*b, h, t, d), (*_, s, _) = shapes[:2]
  return SPLASH_MATMULS[kernel.group(1)] * 2 * math.prod(b) * h * t * s * d


def trip_count(condition: list) -> int | None:
  """N of a counter loop's condition `ROOT compare(counter, constant(N)), direction=LT` (counters start at 0);
  None when the condition is anything else."""
  if not condition:
    return None
  ops = {name: (op, text) for name, _, op, _, _, text in condition}
  _, _, op, operands, attrs, _ = condition[-1]
  if op != "compare" or "direction=LT" not in attrs or len(operands) != 2:
    return None
  bound_op, literal = ops.get(operands[1], (None, ""))
  return int(literal) if bound_op == "constant" and re.fullmatch(r"-?\d+", literal.strip()) else None


def hbm_bytes(op: str, out_type: str, operand_types: list, attrs: str, comps: dict) -> int:
  """Bytes one top-level instruction moves to and from HBM: its operands and result, except that a slice reads
  only the slice (a scan reading its layer's weights from the stacked ones) and an in-place update writes only the
  update (a scan stacking its outputs), also where a fusion does either to one of its parameters."""
  body = re.search(r"calls=%([\w.\-]+)", attrs) if op == "fusion" else None
  if body:
    instrs = comps.get(body.group(1), [])
  else:  # the instruction alone, as if it were a fusion of one
    instrs = [(f"p{i}", t, "parameter", [], "", str(i)) for i, t in enumerate(operand_types)]
    instrs.append(("root", out_type, op, [f"p{i}" for i in range(len(operand_types))], attrs, ""))
  types = {name: t for name, t, *_ in instrs}
  users = collections.defaultdict(list)
  for name, t, o, operands, _, _ in instrs:
    for position, operand in enumerate(operands):
      users[operand].append((o, t, position))
  total = 0
  for name, t, o, *_ in instrs:
    if o != "parameter":
      continue
    uses = users[name]
    if uses and all(u in ("dynamic-slice", "slice") and pos == 0 for u, _, pos in uses):
      total += sum(nbytes(ut) for _, ut, _ in uses)
    elif not (uses and all(u == "dynamic-update-slice" and pos == 0 for u, _, pos in uses)):
      total += nbytes(t)
  root = instrs[-1]
  outputs = [root]
  if root[2] == "tuple":
    by_name = {i[0]: i for i in instrs}
    outputs = [by_name.get(o, ("", "", "", [], "", "")) for o in root[3]]
  for _, t, o, operands, _, _ in outputs:
    total += nbytes(types.get(operands[1], "")) if o == "dynamic-update-slice" and len(operands) > 1 else nbytes(t)
  return total


def call_graph(comps: dict) -> tuple[dict, set, dict]:
  """{caller: [(callee, times per call)]} (a while body its trip count, 1 where unread), the fusion bodies, and the
  loops {body: trip count or None}."""
  calls, fused, loops = collections.defaultdict(list), set(), {}
  for c, instrs in comps.items():
    for _, _, op, _, attrs, _ in instrs:
      if op == "while":
        body, cond = re.search(r"body=%([\w.\-]+)", attrs), re.search(r"condition=%([\w.\-]+)", attrs)
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)  # the GPU compiler's own annotation
        trips = int(known.group(1)) if known else trip_count(comps.get(cond.group(1), [])) if cond else None
        if body:
          loops[body.group(1)] = trips
          calls[c].append((body.group(1), trips or 1))
      for callee in re.findall(r"(?:calls|true_computation|false_computation)=%([\w.\-]+)", attrs):
        calls[c].append((callee, 1))
        if op == "fusion":
          fused.add(callee)
      branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
      for callee in re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else ():
        calls[c].append((callee, 1))
  return calls, fused, loops


def runs(calls: dict, entry: str, with_trips: bool) -> collections.Counter:
  """How many times each computation runs per execution of `entry` (loop bodies once each unless `with_trips`)."""
  order, seen = [], set()

  def visit(c):  # post-order: callees before callers
    if c not in seen:
      seen.add(c)
      for callee, _ in calls[c]:
        visit(callee)
      order.append(c)
  visit(entry)
  count = collections.Counter({entry: 1})
  for c in reversed(order):
    for callee, trips in calls[c]:
      count[callee] += count[c] * (trips if with_trips else 1)
  return count


def source(attrs: str) -> str:
  """Where an instruction comes from, from its metadata's op_name: the pass (forward, backward, or the update
  around them), the model and its first two module names, e.g. "backward MODEL/denoiser/blocks"."""
  m = re.search(r'op_name="([^"]*)"', attrs)
  parts = m.group(1).split("/")[1:] if m else []
  head = parts[0] if parts else ""
  phase = "backward" if head.startswith("transpose(") else "forward" if head.startswith("jvp(") else "update"
  model = re.sub(r"^(transpose\()?(jvp\()?|\)+$", "", head) if phase != "update" else ""
  names = [p for p in parts[1:] if re.fullmatch(r"[A-Za-z_][\w.]*", p) and p not in ("while", "body", "closed_call",
                                                                                      "cond", "remat", "checkpoint")]
  return f"{phase} {'/'.join(([model] if model else []) + names[:2])}".strip()


def costs(hlo_text: str, collective_ops: tuple = ()) -> dict:
  """Matmul FLOPs and HBM bytes of the program once (every computation once, as XLA's cost analysis) and with the
  loops' trip counts (`kernel_flops_once`: the part in Mosaic kernels, which the compiler's own count lacks); the loops found ({body: trips}, None where the count could not be read); and per step, for
  each of `collective_ops` present, its instructions' executions and bytes (each its largest result array), also
  by kind and `source`."""
  comps, entry = parse(hlo_text)
  calls, fused, loops = call_graph(comps)
  once, every = runs(calls, entry, False), runs(calls, entry, True)
  out = {"flops_once": 0, "flops": 0, "bytes_once": 0, "bytes": 0, "loops": loops, "collectives": {},
         "collectives_by_source": {}, "kernel_flops_once": 0}
  for c, instrs in comps.items():
    types = {name: t for name, t, *_ in instrs}
    for name, t, op, operands, attrs, _ in instrs:
      operand_types = [types.get(o, "") for o in operands]
      flops = (conv_flops(t, *operand_types[:2], attrs) if op == "convolution" and len(operand_types) >= 2 else
               dot_flops(t, operand_types[0], attrs) if operand_types and (
                   op == "dot" or op == "custom-call" and "__cublas$" in attrs) else
               splash_flops(name, operand_types) if op == "custom-call" else 0)
      # a fusion's inside stays on chip: HBM traffic is its operands and result, counted at the fusion
      bytes_ = 0 if c in fused or op in NO_BYTES else hbm_bytes(op, t, operand_types, attrs, comps)
      out["flops_once"] += flops * once[c]
      if op == "custom-call":  # not in the compiler's own count at all
        out["kernel_flops_once"] += flops * once[c]
      out["flops"] += flops * every[c]
      out["bytes_once"] += bytes_ * once[c]
      out["bytes"] += bytes_ * every[c]
      kind = op.removesuffix("-start")
      if kind in collective_ops and every[c]:
        moved = every[c] * max((DTYPE_BYTES[dt] * math.prod(d) for dt, d in arrays(t)), default=0)
        for tally in (out["collectives"].setdefault(kind, {"count": 0, "bytes": 0}),
                      out["collectives_by_source"].setdefault(f"{kind} {source(attrs)}", {"count": 0, "bytes": 0})):
          tally["count"] += every[c]
          tally["bytes"] += moved
  return out
