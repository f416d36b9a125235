"""A config's train step compiled for a Cloud TPU slice, or for NVIDIA GPU nodes, on this machine without either
(`python -m lidit_jax.plan --topology v5p-128` / `h100-16`): libtpu's compiler (`pip install "jax[tpu]"`) or XLA's
GPU compiler in jax's CUDA plugin (`pip install jax-cuda12-plugin jax-cuda12-pjrt`, the installed jax's version)
targets the slice's or nodes' compile-only devices (`jax.experimental.topologies`), and the compiled program's own
memory analysis, collectives and cost analysis are reported per chip, as MaxText's `train_compile.py` does. The
host stays on CPU.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
from jax.experimental import topologies

from lidit_jax import chips, cli, hlo_cost, pipeline, sharding, train_step

GiB = chips.GiB
# Per chip (vendor figures, Cloud TPU system architecture pages): HBM capacity in GiB and bandwidth in GB/s.
# NVIDIA's cards as XLA's GPU compiler reads them (its GpuTargetConfigProto, in text form; figures of an H100 SXM
# 80 GB / H200 141 GB as CUDA's deviceQuery reports them): compute capability 9.0, 132 SMs of 128 FP32 lanes.
HOPPER = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
              shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
              block_dim_limit_x=2 ** 31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
              l2_cache_size=50 * 2 ** 20, clock_rate_ghz=1.98, shared_memory_per_block_optin=232448,
              registers_per_core_limit=65536, registers_per_block_limit=65536)
GPU_SPECS = {"h100": dict(HOPPER, memory_bandwidth=3_352_320_000_000, device_memory_size=84_978_434_048,
                          name="NVIDIA H100 80GB HBM3"),
             "h200": dict(HOPPER, memory_bandwidth=4_800_000_000_000, device_memory_size=150_754_820_096,
                          name="NVIDIA H200")}
GPUS_PER_HOST = 8  # an HGX node
# Without a GPU nothing is autotuned, and XLA's default Triton GEMM tiles fail some shapes (LI-DiT-1B's refiner
# output projection: "Couldn't find output tile sizes"): matmuls go to cuBLAS, as XLA does where Triton declines.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32,
           **{gpu: spec["device_memory_size"] / 2 ** 30 for gpu, spec in GPU_SPECS.items()}}
HBM_GBPS = {"v4": 1228, "v5e": 819, "v5p": 2765, "v6e": 1640,
            **{gpu: spec["memory_bandwidth"] / 1e9 for gpu, spec in GPU_SPECS.items()}}
# The names a user may type for a chip -> ours. gcloud calls v5e "v5litepod"; libtpu calls v5p "v5".
CHIP_NAMES = {"v4": "v4", "v5p": "v5p", "v5": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
TORUS_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
MEGACORE = {"v4", "v5p"}  # two TensorCores per chip, one JAX device; gcloud's v4-N / v5p-N count the cores
SQUEEZED = 0.9  # a compiled peak above this share of HBM may be the compiler's own squeeze (its rematerialisation)
MAX_CHIPS = {"v4": 4096, "v5p": 8960, "v5e": 256, "v6e": 256}
VALID_FORMS = ("a gcloud accelerator type, v4-N / v5p-N counting TensorCores (2 per chip: v4-8, v4-128, v5p-8, "
               "v5p-128, ...) or v5litepod-N / v5e-N / v6e-N counting chips (1, 4, 8, ..., 256: v5litepod-256, "
               "v6e-256), N a power of two; or a topology CHIP:AxB[xC] (v4:2x2x1, v5p:4x4x4, v5e:2x2, v6e:16x16) "
               "for other slice shapes; or NVIDIA GPUs, h100-N / h200-N (N GPUs in nodes of 8: h100-8, h100-64) or "
               "h100:HOSTSxGPUS (h100:2x8, h100:1x4)")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute",
               "collective-broadcast")

@dataclasses.dataclass(frozen=True)
class Topology:
  chip: str  # v4 | v5e | v5p | v6e | h100 | h200
  shape: tuple[int, ...]  # chips along the torus' axes, one slice (GPUs: hosts, GPUs per host)
  slices: int = 1

  @property
  def name(self) -> str:
    return f"{self.chip}:{'x'.join(map(str, self.shape))}"

  @property
  def chips(self) -> int:
    return math.prod(self.shape) * self.slices


def torus_shape(chips: int, ndim: int) -> tuple[int, ...] | None:
  """gcloud's layout of a power-of-two slice: from 2x2(x1), double the last of the shortest axes (v5p-128 ->
  4x4x4, v5p-256 -> 4x4x8, v5e-32 -> 4x8); None if `chips` is not such a size."""
  if chips == 1 and ndim == 2:
    return (1, 1)
  dims = [2, 2] + [1] * (ndim - 2)
  while math.prod(dims) < chips:
    i = max(j for j in range(ndim) if dims[j] == min(dims))
    dims[i] *= 2
  return tuple(dims) if math.prod(dims) == chips else None


def parse(name: str, slices: int = 1) -> Topology:
  """`v5p-128`, `v5litepod-256`, `v6e-8`, or `v5p:4x4x4`, with `slices` of it (multi-slice, over DCN)."""
  bad = lambda why: cli.UserError(f"--topology {name!r}: {why}. Fix: use {VALID_FORMS}")
  if slices < 1:
    raise cli.UserError(f"--slices {slices}: must be >= 1 (the number of slices of the pod)")
  gpu = parse_gpus(name.strip().lower(), bad)
  if gpu:
    if slices > 1:
      raise cli.UserError(f"--slices {slices} with GPUs: slices are TPU pods'. Fix: give the hosts in --topology "
                          "(h100:4x8 or h100-32) and drop --slices")
    return gpu
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
  if m:
    chip = CHIP_NAMES.get(m.group(1))
    if chip is None or m.group(1) == "v5":
      raise bad(f"unknown TPU {m.group(1)!r}")
    count = int(m.group(2))
    chips = count // 2 if chip in MEGACORE else count
    if chip in MEGACORE and count % 2:
      raise bad(f"{chip}-N counts TensorCores, two per chip, so N is even")
    shape = torus_shape(chips, TORUS_DIMS[chip]) if 0 < chips <= MAX_CHIPS[chip] else None
    if shape is None:
      raise bad(f"no {chip} slice of {chips} chip(s) here")
    return Topology(chip, shape, slices)
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", name.strip().lower())
  if not m:
    raise bad("not a TPU name")
  chip = CHIP_NAMES.get(m.group(1))
  if chip is None:
    raise bad(f"unknown TPU {m.group(1)!r}")
  shape = tuple(int(d) for d in m.group(2).split("x"))
  if TORUS_DIMS[chip] == 2 and len(shape) == 3 and shape[2] == 1:
    shape = shape[:2]
  if len(shape) != TORUS_DIMS[chip] or min(shape) < 1:
    raise bad(f"a {chip} topology has {TORUS_DIMS[chip]} axes of at least 1 chip")
  return Topology(chip, shape, slices)


def parse_gpus(name: str, bad) -> Topology | None:
  """`h100-16` (16 GPUs, 8 a host) or `h100:2x8` (hosts x GPUs a host); None for any other name."""
  m = re.fullmatch(r"(h100|h200)-(\d+)", name) or re.fullmatch(r"(h100|h200):(\d+)x(\d+)", name)
  if not m:
    return None
  if m.lastindex == 2:
    count = int(m.group(2))
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
      raise bad(f"{count} GPUs do not fill nodes of {GPUS_PER_HOST}")
    shape = (count // GPUS_PER_HOST, GPUS_PER_HOST) if count > GPUS_PER_HOST else (1, count)
  else:
    shape = (int(m.group(2)), int(m.group(3)))
    if min(shape) < 1 or shape[1] > GPUS_PER_HOST:
      raise bad(f"hosts x GPUs a host, at least 1 x 1 and at most {GPUS_PER_HOST} GPUs a host")
  return Topology(m.group(1), shape)


def gpu_target(chip: str) -> str:
  """The card's GpuTargetConfigProto in text form (`GPU_SPECS`)."""
  spec = dict(GPU_SPECS[chip])
  name = spec.pop("name")
  fields = "\n".join(f"  {k}: {v}" for k, v in spec.items())
  return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n"
          f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 }}\ndevice_description_str: "{name}"\n')


def gpu_devices(topology: Topology) -> list:
  """The nodes' compile-only GPUs, from jax's CUDA plugin (no GPU, no CUDA runtime needed)."""
  hosts, per_host = topology.shape
  try:
    return topologies.get_topology_desc("", "cuda", target_config=gpu_target(topology.chip),
                                        topology=f"1x{hosts}x{per_host}").devices
  except NotImplementedError as e:
    raise cli.UserError(f"--topology {topology.name}: jax's CUDA plugin is not installed, so XLA's GPU compiler is "
                        f"missing. Fix: pip install jax-cuda12-plugin=={jax.__version__} "
                        f"jax-cuda12-pjrt=={jax.__version__} (no GPU needed)") from e


def devices(topology: Topology) -> list:
  """The slice's compile-only devices (one per chip; `slice_index` set with several slices), from libtpu; GPUs'
  from jax's CUDA plugin."""
  if topology.chip in GPU_SPECS:
    return gpu_devices(topology)
  # Without these libtpu asks the TPU VM's metadata server and warns about the answer; they describe nothing
  # the compiler reads (the topology is given whole).
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
  # libtpu takes /tmp/libtpu_lockfile to keep TPU chips to one process; there are none here, and compiles may
  # run side by side (two test workers, two slices checked at once)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = {"chip_config_name": "megacore"} if topology.chip in MEGACORE else {}
  if math.prod(topology.shape) < 4:  # a one-chip slice is one host of one chip (default hosts hold 2x2)
    kwargs["chips_per_host_bounds"] = (1, 1, 1)
  if topology.slices > 1:
    kwargs["num_slices"] = topology.slices
  try:
    return topologies.get_topology_desc(topology.name, "tpu", **kwargs).devices
  except RuntimeError as e:
    message = str(e).strip().splitlines()[0]
    if "not installed" in message:
      raise cli.UserError(f"--topology {topology.name}: libtpu is not installed, so the TPU compiler is missing. "
                          f'Fix: pip install "jax[tpu]=={jax.__version__}" (no TPU needed)') from e
    raise cli.UserError(f"--topology {topology.name}: libtpu refuses it ({message}). Fix: use "
                        f"{VALID_FORMS}") from e


def memory(compiled) -> dict:
  """The compiled program's memory per chip, from its own analysis: arguments, temporaries, outputs not aliased
  to (donated) arguments, generated code, and the peak (the compiler's, else their sum)."""
  m = compiled.memory_analysis()
  get = lambda key: int(getattr(m, key, 0) or 0)
  out = {"argument_bytes": get("argument_size_in_bytes"), "temp_bytes": get("temp_size_in_bytes"),
         "output_bytes": get("output_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes"),
         "generated_code_bytes": get("generated_code_size_in_bytes")}
  out["output_not_aliased_bytes"] = max(0, out["output_bytes"] - out["alias_bytes"])
  # Everything the program holds in HBM at its worst (MaxText's total, plus the code): the TPU compiler's
  # `peak_memory_in_bytes` comes out below its own temporaries, so it is only reported beside.
  out["peak_bytes"] = (out["argument_bytes"] + out["output_not_aliased_bytes"] + out["temp_bytes"]
                       + out["generated_code_bytes"])
  out["compiler_peak_bytes"] = get("peak_memory_in_bytes")
  return out


def out_of_memory(error: Exception) -> dict | None:
  """What the TPU compiler says when it refuses a program larger than HBM ("RESOURCE_EXHAUSTED: Ran out of memory
  on HBM, the total memory required for HLO temporaries (157.87G) exceeds available HBM (15.75G)"); None for any
  other error. There is no compiled program then: the bytes are the message's."""
  message = str(error)
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  units = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}  # XLA prints binary units
  size = lambda m: int(float(m.group(1)) * units[m.group(2)]) if m else None
  required = size(re.search(r"required[^(]*\(([\d.]+)([KMGT]?)i?B?\)", message)
                  or re.search(r"Used ([\d.]+)([KMGT]?)i?B? of", message))
  available = size(re.search(r"available HBM \(([\d.]+)([KMGT]?)i?B?\)", message)
                   or re.search(r"of ([\d.]+)([KMGT]?)i?B? hbm", message))
  return {"argument_bytes": None, "temp_bytes": required, "output_not_aliased_bytes": None,
          "generated_code_bytes": None, "peak_bytes": required, "compiler_hbm_bytes": available,
          "compiler_message": message.strip().splitlines()[0]}


def cost(compiled, hlo_text: str, chip: str, model_flops_per_chip: float | None = None) -> dict:
  """The compiler's cost model per chip with every loop counted its trip count times, the roofline step time it
  implies and, from the model's FLOPs, the MFU that step would have (estimates: no overlap, collectives not timed).
  hlo_cost counts the loops' repeats and the Mosaic (splash attention) kernels, which the compiler cannot see into:
  their matmul FLOPs are added to the compiler's FLOPs, and its HBM bytes scale
  the compiler's by the ratio with and without repeats (each matched an unrolled model's own figures within 2 %)."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis or {}
  loops = hlo_cost.costs(hlo_text, COLLECTIVES)
  if "flops" in analysis:
    once = float(analysis["flops"])
    flops = once + loops["kernel_flops_once"] + loops["flops"] - loops["flops_once"]
    accessed = float(analysis.get("bytes accessed", 0.0)) * loops["bytes"] / max(loops["bytes_once"], 1)
  else:  # a GPU target gives no cost analysis: hlo_cost's own counts of the program
    once, flops, accessed = float(loops["flops_once"]), float(loops["flops"]), float(loops["bytes"])
  compute_s = flops / (chips.CHIP_PEAK_TFLOPS[chip] * 1e12)
  memory_s = accessed / (HBM_GBPS[chip] * 1e9)
  step = max(compute_s, memory_s)
  out = {"cost_source": "compiler" if "flops" in analysis else "hlo", "flops_per_chip_estimate": flops,
         "bytes_accessed_per_chip_estimate": accessed,
         "compiler_flops_loop_bodies_once": once,
         "loop_trip_counts": sorted(t for t in loops["loops"].values() if t), "collectives": loops["collectives"],
         "collectives_by_source": loops["collectives_by_source"], "step_seconds_estimate": step,
         "bound": "compute" if compute_s >= memory_s else "memory"}
  if model_flops_per_chip and step > 0:
    out["mfu_estimate"] = model_flops_per_chip / (step * chips.CHIP_PEAK_TFLOPS[chip] * 1e12)
  return out


def compile_train_step(config, topology: Topology, model_flops_per_chip: float | None = None) -> dict:
  """Compile the config's train step for the slice here; the report's bytes are the compiled program's own.
  `model_flops_per_chip` (the planner's) gives the MFU the cost model implies."""
  return compile_for(lambda devs: train_step.lower_train_step(config, devs), topology, model_flops_per_chip)


def compile_sample(config, topology: Topology, batch: int) -> dict:
  """The same for `Pipeline`'s sampling function at `batch` prompts (config.sample's steps, sampler, guidance)."""
  return {**compile_for(lambda devs: pipeline.lower_sample(config, batch, devs), topology), "batch": batch}


def compile_for(lower, topology: Topology, model_flops_per_chip: float | None = None) -> dict:
  """`lower(devices)` -> a jax Lowered, compiled for the slice's devices: the memory / collectives / cost report."""
  devs = devices(topology)
  start = time.perf_counter()
  lowered = lower(devs)
  hbm = int(HBM_GIB[topology.chip] * GiB)
  out = {"topology": topology.name, "slices": topology.slices, "chip": topology.chip, "chips": len(devs),
         "hbm_bytes": hbm, "jax": jax.__version__}
  try:
    compiled = lowered.compile(GPU_COMPILER_OPTIONS if topology.chip in GPU_SPECS else None)
  except jax.errors.JaxRuntimeError as e:
    oom = out_of_memory(e)
    if oom is None:
      raise
    peak = oom["peak_bytes"]
    return {**out, "compile_seconds": round(time.perf_counter() - start, 1), **oom, "fits": False,
            "headroom_bytes": None if peak is None else hbm - peak}
  out["compile_seconds"] = round(time.perf_counter() - start, 1)
  mem = memory(compiled)
  hlo = compiled.as_text()
  return {**out, **mem, "fits": mem["peak_bytes"] <= hbm, "headroom_bytes": hbm - mem["peak_bytes"],
          "mosaic_kernels": hlo.count('custom_call_target="tpu_custom_call"'),
          **cost(compiled, hlo, topology.chip, model_flops_per_chip)}


def configure(config, topology: Topology, chip: str | None = None, num_devices: int | None = None):
  """The config on the slice: `--slices N` puts the slices on mesh.dcn_data unless the config names them.
  `chip` / `num_devices` (the planner's --chip / --devices), when given, must agree with the slice."""
  if chip and chip != topology.chip:
    raise cli.UserError(f"--chip {chip} but --topology {topology.name} is {topology.chip}. Fix: drop --chip")
  if num_devices and num_devices != topology.chips:
    raise cli.UserError(f"--devices {num_devices} but --topology {topology.name} has {topology.chips} chips. Fix: "
                        "drop --devices")
  dcn = int(config.mesh.dcn_data) * int(config.mesh.dcn_fsdp)
  if dcn == 1 and topology.slices > 1:
    config.mesh.dcn_data = topology.slices
  elif dcn != topology.slices:
    raise cli.UserError(f"mesh.dcn_data x dcn_fsdp = {dcn} slices, but --slices {topology.slices}. Fix: pass "
                        f"--slices {dcn}, or set --config.mesh.dcn_data / dcn_fsdp to the slices' count")
  sharding.mesh_shape(config.mesh, math.prod(topology.shape))  # the mesh describes one slice: refused with its fix
  return config


def planner_view(config, topology: Topology):
  """The same mesh flattened for the planner (which knows no DCN axes): data x dcn_data, fsdp x dcn_fsdp."""
  c = config.copy_and_resolve_references()
  per_slice = math.prod(topology.shape)
  data, fsdp, tensor = sharding.mesh_shape(config.mesh, per_slice)
  c.mesh.update(data=data * int(config.mesh.dcn_data), fsdp=fsdp * int(config.mesh.dcn_fsdp), tensor=tensor,
                dcn_data=1, dcn_fsdp=1)
  return c


def format_compiled(c: dict, planned_bytes: int | None, what: str = "the train step") -> str:
  g = lambda b: f"{b / GiB:.3f} GiB"
  slices = f" x {c['slices']} slices" if c["slices"] > 1 else ""
  where = f"{c['topology']}{slices} ({c['chips']} x {c['chip']}, {c['hbm_bytes'] // GiB} GiB HBM each)"
  if "compiler_message" in c:  # refused by the compiler: no program, no analysis
    over = f", {g(-c['headroom_bytes'])} over" if c["headroom_bytes"] is not None else ""
    planned = f"\n  the planner's estimate: {g(planned_bytes)} per chip" if planned_bytes else ""
    return (f"compiling {what} for {where}: does NOT fit{over}; the compiler refused it after "
            f"{c['compile_seconds']:.0f} s: {c['compiler_message']}{planned}")
  verdict = (f"fits, {g(c['headroom_bytes'])} to spare" if c["fits"] else f"does NOT fit: {g(-c['headroom_bytes'])} "
             "over")
  lines = [f"compiled {what} for {where} in {c['compile_seconds']:.0f} s; per chip, the compiler's memory analysis:"]
  for k in ("argument_bytes", "temp_bytes", "output_not_aliased_bytes", "generated_code_bytes", "peak_bytes"):
    lines.append(f"  {k.removesuffix('_bytes'):>32}: {c[k] / GiB:10.3f} GiB")
  lines.append(f"  peak vs HBM: {verdict}" + (f"; the planner's estimate {g(planned_bytes)} is "
                                                 f"{planned_bytes / max(c['peak_bytes'], 1):.2f}x the compiled peak"
                                                 if planned_bytes else ""))
  if planned_bytes and planned_bytes > c["hbm_bytes"] * SQUEEZED and c["peak_bytes"] > c["hbm_bytes"] * SQUEEZED:
    lines.append("  the compiler rematerialised on its own to squeeze the step into HBM (recompute: slower); the "
                 "planner's figure is what the step holds unsqueezed")
  if c["collectives"]:
    lines.append("collectives per chip and step (loops counted): " + ", ".join(
        f"{k} {v['count']}x ({v['bytes'] / 2 ** 20:.1f} MiB in all)" for k, v in sorted(c["collectives"].items())))
    top = sorted(c["collectives_by_source"].items(), key=lambda kv: -kv[1]["bytes"])[:6]
    lines.append("  the most bytes: " + "; ".join(f"{k} {v['bytes'] / 2 ** 20:.0f} MiB ({v['count']}x)"
                                                 for k, v in top))
  else:
    lines.append("collectives: none")
  if c["mosaic_kernels"]:
    lines.append(f"Mosaic (Pallas) kernels: {c['mosaic_kernels']} custom calls")
  trips = c["loop_trip_counts"]
  loops = f"loops counted {', '.join(map(str, trips))} times" if trips else "no loops"
  mfu = f", MFU {c['mfu_estimate']:.2f}" if "mfu_estimate" in c else ""
  source = ("cost model" if c.get("cost_source", "compiler") == "compiler" else
            "the program's matmuls (XLA has no cost model for a GPU target; cuDNN's kernels not counted)")
  lines.append(f"{source} (estimates, {loops}): {c['flops_per_chip_estimate'] / 1e12:.3f} TFLOP, "
               f"{c['bytes_accessed_per_chip_estimate'] / GiB:.2f} GiB accessed per chip -> "
               f"{c['step_seconds_estimate']:.4f} s/step ({c['bound']}-bound, no overlap, collectives not "
               f"timed){mfu}")
  return "\n".join(lines)
