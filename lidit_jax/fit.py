"""`python -m lidit_jax.plan --config C --topology T --fit`: the cheapest memory settings that fit the slice: a remat
policy, `train.grad_accum`, the split of the slice between `mesh.data` and `mesh.fsdp` (a width that 256-way fsdp
does not divide is replicated: 128 x 2 may fit where 256 does not) and, only where nothing else fits,
`text.cache` (the towers out of the step). The planner
ranks and screens the candidates (seconds each); the TPU compiler confirms the first it accepts, and where the
compiled program does not fit after all, the planner's estimates are scaled by what the compile showed and the
search goes on (a few compiles at most). Prints the override flags to add.
"""
from __future__ import annotations

import itertools
import math

from lidit_jax import cli, sharding, tpu_compile

REMAT = ("none", "dots", "dots_no_batch", "full")  # keeps the most first: least recomputed in the backward pass
# Step compute relative to no remat (the backward pass recomputes what was not kept: "full" the whole forward,
# +1/3 of forward + backward); a micro-batch costs a little (its weights gathered again, a smaller matmul).
REMAT_COST = {"none": 1.0, "dots": 1.05, "dots_no_batch": 1.1, "full": 4 / 3}
ACCUM_COST = 0.03
MARGIN = 0.92  # of HBM the planner's estimate may take: it is an estimate
MAX_COMPILES = 3


def candidates(config, topology) -> list[dict]:
  """Override sets, cheapest first: every remat policy x every grad_accum the batch divides into x every split of
  the slice's data-parallel devices between mesh.data and mesh.fsdp (free in compute: the config's own first),
  then the same with the text features precomputed (a workflow change: last)."""
  data, fsdp, _ = sharding.mesh_shape(config.mesh, math.prod(topology.shape))
  b, dcn = config.train.batch_size, int(config.mesh.dcn_data) * int(config.mesh.dcn_fsdp)
  # the config's split first, then data-parallel devices moved to fsdp (shards a replicated tower or model)
  # or back (a width fsdp does not divide), up to 16x either way
  meshes = [(data, fsdp)] + [(data // 2 ** k, fsdp * 2 ** k) for k in range(1, 5) if data % 2 ** k == 0] + [
      (data * 2 ** k, fsdp // 2 ** k) for k in range(1, 5) if fsdp % 2 ** k == 0]
  caches = [config.text.cache] if config.text.cache else ["", "abstract"]
  out = []
  for cache, remat, k, (d, f) in itertools.product(caches, REMAT, (1, 2, 4, 8, 16, 32, 64), meshes):
    if b % (d * f * dcn * k):
      continue
    out.append({"model.remat": remat, "train.grad_accum": k, "text.cache": cache, "mesh.data": d, "mesh.fsdp": f,
                "cost": (cache != config.text.cache, REMAT_COST[remat] * (1 + ACCUM_COST * (k - 1)), d != data)})
  return sorted(out, key=lambda c: c["cost"])


def apply(config, candidate: dict):
  c = config.copy_and_resolve_references()
  c.model.remat, c.train.grad_accum, c.text.cache = (candidate["model.remat"], candidate["train.grad_accum"],
                                                     candidate["text.cache"])
  c.mesh.data, c.mesh.fsdp = candidate["mesh.data"], candidate["mesh.fsdp"]
  return c


def flags(config, candidate: dict) -> list[str]:
  """The overrides that differ from the config, as command-line flags."""
  out = [f"--config.model.remat={candidate['model.remat']}"] if candidate["model.remat"] != config.model.remat else []
  if candidate["train.grad_accum"] != config.train.grad_accum:
    out.append(f"--config.train.grad_accum={candidate['train.grad_accum']}")
  if candidate["cost"][2]:  # not the config's own split
    out += [f"--config.mesh.data={candidate['mesh.data']}", f"--config.mesh.fsdp={candidate['mesh.fsdp']}"]
  if candidate["text.cache"] != config.text.cache:
    out.append("--config.text.cache=DIR")
  return out


def search(config, topology, estimate, log=print) -> dict:
  """{"flags", "planned_bytes", "compiled"}: the cheapest candidate the compiler confirms; a UserError naming the
  smallest estimate when none fits. `estimate(config)`: the planner's bytes per chip (plan.py passes it)."""
  hbm = int(tpu_compile.HBM_GIB[topology.chip] * tpu_compile.GiB)
  scale, compiles, smallest = 1.0, 0, None
  for cand in candidates(config, topology):
    c = apply(config, cand)
    planned = estimate(c)
    scaled = planned * scale
    smallest = scaled if smallest is None else min(smallest, scaled)
    if scaled > MARGIN * hbm:
      continue
    if compiles == MAX_COMPILES:
      break
    log(f"--fit: trying {' '.join(flags(config, cand)) or 'the config as it is'} (planner x {scale:.2f}: "
        f"{scaled / tpu_compile.GiB:.2f} GiB per chip); compiling ...")
    compiled = tpu_compile.compile_train_step(c, topology)
    compiles += 1
    if compiled["fits"]:
      return {"flags": flags(config, cand), "planned_bytes": planned,
              "compiled": compiled, "compiles": compiles}
    # the planner was short here: hold every later estimate to what the compiler showed
    scale = max(scale, (compiled["peak_bytes"] or MARGIN * hbm) / planned)  # None: an unparsed OOM message
    log(f"--fit: the compiled step takes {(compiled['peak_bytes'] or 0) / tpu_compile.GiB:.2f} GiB per chip: does "
        "not fit")
  raise cli.UserError(f"--fit: no remat policy, grad_accum or text cache fits the train step into {topology.name}'s "
                      f"{hbm // tpu_compile.GiB} GiB per chip (smallest estimate {smallest / tpu_compile.GiB:.2f} "
                      f"GiB; {compiles} compile(s)). Fix: a larger slice, or a larger mesh.fsdp / mesh.tensor")
