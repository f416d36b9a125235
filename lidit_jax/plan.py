"""Memory and compute plan of a config on a device mesh, from abstract shapes only (nothing is allocated,
no devices are needed):

  python -m lidit_jax.plan --config configs/lidit_10b.py --config.mesh.fsdp=256 [--devices 256] [--chip v5p]
  python -m lidit_jax.plan --config configs/lidit_1b.py --topology v5p-128 [--slices 2]   # + the TPU compiler's
  python -m lidit_jax.plan --config configs/lidit_1b.py --topology h100-64                # + XLA's GPU compiler's

Per device: bytes of parameters, gradients, optimizer state (AdamW: two moments) and EMA, each sharded by
the config's logical-axis rules on the mesh; the frozen text towers and autoencoder; estimates of the
activations the denoiser family keeps for the backward pass (at the config's batch and remat policy) and of
the autoencoder's encoding peak. Per step: model FLOPs (training counts forward + backward = 3x forward; the
frozen towers' and autoencoder's forward separately) and, for a chip, the step time at a given MFU. `train.py` logs TFLOP/s per device and MFU from the same FLOP count.
With --topology the train step is also compiled for that TPU slice or those NVIDIA GPU nodes on this machine, no
TPU or GPU needed (lidit_jax/tpu_compile.py): the compiled program's memory per chip against HBM, its collectives
and cost model, beside this estimate.
"""
from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from lidit_jax import cli
from lidit_jax import configs
from lidit_jax import denoisers
from lidit_jax import fit
from lidit_jax import lora as lora_lib
from lidit_jax import sharding
from lidit_jax import tpu_compile
from lidit_jax import autoencoder as autoencoder_lib
from lidit_jax import model as model_lib
from lidit_jax import state as state_lib
from lidit_jax.chips import CHIP_PEAK_TFLOPS, DEVICE_KINDS, GiB, chip_of  # noqa: F401  (plan.*, for callers)
from lidit_jax.convert import hf_text


def shard_elements(shape, spec, mesh_sizes: dict) -> int:
  """Elements of one device's shard (dims split by their mesh axes, rounded up)."""
  n = 1
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    n *= math.ceil(dim / math.prod(mesh_sizes[a] for a in names))
  return n


def per_device_bytes(boxed_tree, mesh_sizes: dict, rules, itemsize: int | None = None, keep=None) -> int:
  """Bytes of one device's shards of a tree of (boxed) abstract arrays under logical `rules` (`keep`: a tree of
  bools of the same structure unboxed, the leaves to count; default all)."""
  pairs = _leaves_and_mesh_specs(boxed_tree, mesh_sizes, rules)
  kept = jax.tree.leaves(keep) if keep is not None else [True] * len(pairs)
  return sum(shard_elements(v.shape, spec, mesh_sizes) * (itemsize or v.dtype.itemsize)
             for (v, spec), counted in zip(pairs, kept, strict=True) if counted)


# Compiled temporaries per byte of replicated trainable parameters (f32) beyond their gradient: their bf16 copy
# for the forward pass, hoisted out of the layer scan, and the scan's stacked gradient buffers (LI-DiT-1B, width
# 1152 over fsdp=256: 3.32 and 3.15 GiB of extra temporaries for 2.57 GiB replicated on v5p-512 and v6e-256).
REPLICATED_UPDATE = 1.25


def _leaves_and_mesh_specs(boxed_tree, mesh_sizes: dict, rules):
  """[(abstract array, mesh PartitionSpec as the trainer places it)] for a tree of (boxed) abstract arrays."""
  specs = nn.get_partition_spec(boxed_tree)
  leaves = jax.tree.leaves(boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  out = []
  for leaf, spec in zip(leaves, spec_leaves, strict=True):
    value = leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf
    mesh_spec = nn.logical_to_mesh_axes(spec, rules) if len(spec) else spec
    out.append((value, tuple(sharding.fit_spec(value.shape, mesh_spec, mesh_sizes))))
  return out


def replicated_bytes(boxed_tree, mesh_sizes: dict, rules, keep) -> int:
  """f32 bytes per device of the kept leaves beyond an even split over fsdp x tensor: what fit_spec had to
  replicate because no dimension divides the axis."""
  split = mesh_sizes["fsdp"] * mesh_sizes["tensor"]
  return int(sum(4 * (shard_elements(v.shape, spec, mesh_sizes) - v.size / split)
                 for (v, spec), k in zip(_leaves_and_mesh_specs(boxed_tree, mesh_sizes, rules), jax.tree.leaves(keep))
                 if k))


def largest_replicated(boxed_tree, mesh_sizes: dict, rules) -> tuple:
  """The shape of the largest leaf that fsdp leaves unsplit (for the note)."""
  unsplit = [v for v, spec in _leaves_and_mesh_specs(boxed_tree, mesh_sizes, rules)
             if not any("fsdp" in ((a,) if isinstance(a, str) else a or ()) for a in spec)]
  return max(unsplit, key=lambda v: v.size).shape if unsplit else ()


def sharded_mesh_hint(config, num_devices: int, params, rules, keep, replicated: int) -> str:
  """The first mesh (moving a factor of fsdp to data) that shards what `replicated` counts, as override flags."""
  sizes = sharding.mesh_shape(config.mesh, num_devices)
  data, fsdp, tensor = (dict(zip(sharding.AXES, sizes))[a] for a in ("data", "fsdp", "tensor"))
  for f in range(2, fsdp + 1):
    if fsdp % f == 0:
      trial = {"data": data * f, "fsdp": fsdp // f, "tensor": tensor}
      if replicated_bytes(params, trial, rules, keep) < replicated / 10:
        return f"--config.mesh.data={data * f} --config.mesh.fsdp={fsdp // f} shards them (or see plan --fit)"
  return "a smaller fsdp axis would shard them"


def model_flops_per_example(config, tower_cfgs: dict) -> dict:
  """Forward FLOPs of one example: the denoiser family's groups, and `towers` (2 x weights x tokens +
  attention, per tower)."""
  lens = [config.text.towers[n].max_length for n in tower_cfgs]
  shapes = model_lib.text_shapes(config, model_lib.tower_dims(config, tower_cfgs))
  out = denoisers.flops_per_example(config, shapes)
  towers = 0
  for name, l, (_, cfg) in zip(tower_cfgs, lens, tower_cfgs.values()):
    hd = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "d_ff", 4 * hd)
    passes = 2 if config.text.towers[name].output == "scores" else 1  # each block again, on tokens alone
    towers += passes * cfg.num_layers * (2 * l * (4 * hd * hd + 3 * hd * inter) + 4 * l * l * hd)
  return {**out, "towers": towers}


def text_feature_bytes(config, tower_cfgs: dict) -> dict:
  """{tower: bytes of one prompt's features} as the conditioner reads them (cached by encode_prompts, or made by
  the towers in the step): every hidden state or per-block score for all-layer towers, heavy for a large LLM."""
  shapes = model_lib.text_shapes(config, model_lib.tower_dims(config, tower_cfgs))
  return {n: int(np.prod(shape)) * jnp.dtype(model_lib.DTYPES[config.text.towers[n].dtype]).itemsize
          for n, shape in zip(tower_cfgs, shapes)}


def step_flops(config, tower_cfgs: dict | None = None, encode_flops: float = 0.0) -> dict:
  """Model FLOPs of one training step: `train` (forward + backward of the trainable model, 3x forward),
  `towers` (their forward; 0 when features come from text.cache) and `autoencoder` (encoding the batch's
  images, `encode_flops` each; 0 when the data are precomputed latents)."""
  flops = model_flops_per_example(config, tower_cfgs or model_lib.planned_towers(config))
  b = config.train.batch_size
  trainable = sum(v for k, v in flops.items() if k != "towers")
  return {"train": 3 * trainable * b,
          "towers": 0 if config.text.cache else flops["towers"] * b,
          "autoencoder": 0 if config.data.source == "features" else encode_flops * b}


def autoencoder_plan(config, batch_per_device: int) -> dict:
  """The frozen autoencoder's share: its (replicated) parameter bytes, the estimated peak of encoding one
  device's batch and one image's encoder FLOPs; zeros for pixel space, for precomputed latents (no encoding
  in the step) and for a VAE whose checkpoint does not exist yet."""
  ae, params = autoencoder_lib.build(config.autoencoder, abstract=True)
  if ae is None or params is None:
    return {"params": 0, "activations": 0, "encode_flops": 0.0, "planned": ae is not None}
  encodes = config.data.source != "features"
  hw = (config.data.image_size, config.data.image_size)
  return {"params": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params)),
          "activations": ae.encode_peak_bytes(batch_per_device, hw) if encodes else 0,
          "encode_flops": ae.encode_flops(params, hw), "planned": True}


def platform_of(chip: str | None) -> str:
  """The platform a chip name is on; no chip: a TPU's (the pods the planner is for)."""
  return {"cpu": "cpu", "h100": "gpu", "h200": "gpu"}.get(chip, "tpu")


def plan(config, num_devices: int, chip: str | None = None, mfu: float = 0.4, count_flops: bool = True) -> dict:
  """The plan of `config` on `num_devices` (of `chip`); `count_flops=False`: memory only, no FLOP count (which
  lowers a U-Net: most of a plan's seconds; `--fit` plans many candidates)."""
  dims = sharding.mesh_shape(config.mesh, num_devices)
  mesh_sizes = dict(zip(sharding.AXES, dims))
  rules = sharding.rules(config.sharding_rules)
  towers = model_lib.planned_towers(config)
  params = model_lib.abstract_params(config, towers)
  n_params = model_lib.count_params(nn.unbox(params))
  p_bytes = per_device_bytes(params, mesh_sizes, rules, itemsize=4)  # float32 master weights
  adapter = lora_lib.Adapter.of(config.lora, sharding.axis_names(params), denoisers.lora_targets(config))
  if adapter is None:
    # train.freeze: frozen parameters get no optimizer state, and XLA drops their unused gradients; EMA keeps them
    trained = params
    trainable = jax.tree.map(lambda f: not f, state_lib.matching(nn.unbox(params), config.train.freeze))
  else:  # LoRA: the factors train (gradients, optimizer state, EMA); the whole model is frozen
    trained = jax.eval_shape(lambda r: adapter.init(r, nn.unbox(params), boxed=True), jax.random.key(0))
    trainable = jax.tree.map(lambda _: True, nn.unbox(trained))
  t_bytes = per_device_bytes(trained, mesh_sizes, rules, itemsize=4, keep=trainable)
  replicated = replicated_bytes(trained, mesh_sizes, rules, trainable)
  tower_bytes, tower_params = 0, 0
  seen = set()
  for name, (fam, cfg) in towers.items():
    tc = config.text.towers[name]
    if tc.init != "random" and (tc.init, tc.dtype) in seen:  # SDXL's pooled output: text_encoder_2's weights again
      continue
    seen.add((tc.init, tc.dtype))
    abstract = hf_text.abstract_params(fam.make_module(cfg, jnp.float32))
    tower_params += model_lib.count_params(hf_text.strip_boxes(abstract))
    itemsize = jnp.dtype(model_lib.DTYPES[config.text.towers[name].dtype]).itemsize
    tower_bytes += per_device_bytes(abstract, mesh_sizes, rules, itemsize)
  act_itemsize = jnp.dtype(model_lib.DTYPES[config.model.dtype]).itemsize
  batch_per_device = math.ceil(config.train.batch_size / (mesh_sizes["data"] * mesh_sizes["fsdp"]))
  micro_batch = math.ceil(batch_per_device / config.train.grad_accum)  # what one forward / backward pass holds
  dims = model_lib.tower_dims(config, towers)
  attention = model_lib.attention_implementation(config, platform_of(chip))
  acts = denoisers.activation_bytes(config, micro_batch, model_lib.text_shapes(config, dims), mesh_sizes["tensor"],
                                   act_itemsize, attention)
  ae = autoencoder_plan(config, micro_batch)
  feature_bytes = text_feature_bytes(config, towers)
  flops = (step_flops(config, towers, ae["encode_flops"]) if count_flops else
           {"train": 0.0, "towers": 0.0, "autoencoder": 0.0})
  batch = config.train.batch_size
  train_flops, frozen_flops = flops["train"], flops["towers"] + flops["autoencoder"]
  # With cached features the towers stay off the devices (text.cache=memory: loaded, run once per caption), and
  # the features are the step's input for the whole batch; the towers make them per micro-batch.
  towers_on_device = config.text.cache in ("", "memory")
  features_held = batch_per_device if config.text.cache else micro_batch
  per_device = {"params": p_bytes, "grads": t_bytes, "optimizer": 2 * t_bytes,
                "ema": p_bytes if adapter is None else t_bytes,
                # LoRA: the factors, and the merged copy of each targeted kernel the step applies
                **({} if adapter is None else {"lora_factors": t_bytes, "lora_merged_kernels": per_device_bytes(
                    params, mesh_sizes, rules, itemsize=4, keep=_targeted(params, adapter))}),
                "frozen_towers": tower_bytes if towers_on_device else 0, "autoencoder": ae["params"],
                "activations_estimate": acts, "text_features": features_held * sum(feature_bytes.values()),
                "autoencoder_activations_estimate": ae["activations"],
                "replicated_update_estimate": int(REPLICATED_UPDATE * replicated)}
  per_device["total"] = sum(per_device.values())
  trained_params = n_params if adapter is None else model_lib.count_params(nn.unbox(trained))
  out = {"mesh": mesh_sizes, "devices": num_devices, "trainable_params": trained_params, "tower_params": tower_params,
         **({} if adapter is None else {"lora_base_params": n_params}),
         "bytes_per_device": per_device,
         "params_plus_optimizer_vs_even_split": (p_bytes * 3) / (n_params * 4 * 3 / num_devices),
         "model_tflop_per_step": train_flops / 1e12, "tower_tflop_per_step": flops["towers"] / 1e12,
         "autoencoder_tflop_per_step": flops["autoencoder"] / 1e12, "autoencoder_planned": ae["planned"],
         "batch_size": batch, "remat": config.model.remat, "attention": attention,
         "text_feature_bytes_per_prompt": feature_bytes}
  notes = []
  if replicated > max(2 ** 26, 0.1 * t_bytes):
    notes.append(f"{replicated / GiB:.2f} GiB per device of trainable parameters are replicated: no dimension of "
                 f"theirs divides fsdp={mesh_sizes['fsdp']} (the largest: {largest_replicated(params, mesh_sizes, rules)}); "
                 + sharded_mesh_hint(config, num_devices, params, rules, trainable, replicated))
  if (config.train.freeze or adapter is not None) and t_bytes < p_bytes / 2:  # most of the model frozen (LLM4GEN, the Diff Adapter)
    notes.append("most of the model is frozen (train.freeze or LoRA): the activation estimate is an upper bound, XLA "
                 "keeps only what the trained parts' gradients need (compiled: 0.85x of it for LLM4GEN's CAM, "
                 "0.2x for the Diff Adapter's new attentions)")
  if notes:
    out["notes"] = notes
  if chip:
    peak = CHIP_PEAK_TFLOPS[chip]
    out.update(chip=chip, peak_tflops_per_chip=peak, assumed_mfu=mfu,
               step_seconds_at_mfu=(train_flops + frozen_flops) / 1e12 / (num_devices * peak * mfu))
  return out


def _targeted(boxed, adapter) -> dict:
  """A tree of bools (unboxed): the kernels the LoRA adapter gives a pair."""
  return jax.tree_util.tree_map_with_path(lambda p, _: tuple(k.key for k in p) in adapter.kernels, nn.unbox(boxed))


def format_plan(p: dict) -> str:
  base = f" (LoRA factors over a {p['lora_base_params'] / 1e9:.3f} B frozen model)" if "lora_base_params" in p else ""
  lines = [f"mesh {p['mesh']} on {p['devices']} devices; {p['trainable_params'] / 1e9:.3f} B trainable{base}, "
           f"{p['tower_params'] / 1e9:.3f} B frozen; batch {p['batch_size']}, remat {p['remat']}, "
           f"attention {p['attention']}",
           "per device:"]
  for k, v in p["bytes_per_device"].items():
    lines.append(f"  {k:>32}: {v / GiB:10.3f} GiB")
  lines.append(f"  params + optimizer vs total / devices: {p['params_plus_optimizer_vs_even_split']:.3f}x")
  lines.append(f"model FLOPs per step: {p['model_tflop_per_step']:.1f} TFLOP (+ forward of the towers "
               f"{p['tower_tflop_per_step']:.1f}, of the autoencoder {p['autoencoder_tflop_per_step']:.1f} TFLOP)")
  lines.append("text features per prompt: " + ", ".join(f"{n} {b / 2 ** 20:.2f} MiB" for n, b in
                                                        p["text_feature_bytes_per_prompt"].items()))
  if not p["autoencoder_planned"]:
    lines.append("autoencoder: not planned (no VAE at autoencoder.path yet): its parameters, activations and "
                 "FLOPs are left out")
  lines += [f"note: {n}" for n in p.get("notes", [])]
  if "chip" in p:
    lines.append(f"on {p['devices']} x {p['chip']} ({p['peak_tflops_per_chip']:.0f} TFLOP/s peak) at MFU "
                 f"{p['assumed_mfu']:.2f}: {p['step_seconds_at_mfu']:.2f} s/step")
  return "\n".join(lines)


def main(argv):
  f = flags.FLAGS
  if f.topology:
    topology = tpu_compile.parse(f.topology, f.slices)  # a bad name fails before the config loads
    jax.config.update("jax_platforms", "cpu")  # the host; the slice's devices exist for the compiler only
  elif f.slices != 1:
    raise cli.UserError(f"--slices {f.slices} without --topology. Fix: add --topology (e.g. v5p-128)")
  config = configs.load_from_flags(data=False)  # shapes only: the dataset need not exist here
  if not f.topology:
    devices = f.devices or math.prod(max(1, int(config.mesh[a])) for a in sharding.AXES)
    p = plan(config, devices, f.chip, f.mfu)
    print(format_plan(p))
    print(json.dumps(p))
    return
  config = tpu_compile.configure(config, topology, f.chip, f.devices)
  if f.fit and f.sample:
    raise cli.UserError("--fit searches the train step's settings; --sample compiles sampling. Fix: pass one")
  p = plan(tpu_compile.planner_view(config, topology), topology.chips, topology.chip, f.mfu)
  if not f.sample:
    print(format_plan(p), flush=True)  # the estimate first: the compile takes minutes for a large config
  if f.fit:
    found = fit.search(config, topology, lambda c: plan(tpu_compile.planner_view(c, topology), topology.chips,
                                                        topology.chip, count_flops=False)["bytes_per_device"][
                                                            "total"])
    compiled = found["compiled"]
    print(tpu_compile.format_compiled(compiled, found["planned_bytes"]))
    print(f"--fit: add {' '.join(found['flags']) or 'nothing: the config fits as it is'}"
          + (" (DIR from python -m lidit_jax.encode_prompts)" if "--config.text.cache=DIR" in found["flags"] else "")
          + f"; confirmed by {found['compiles']} compile(s)")
    print(json.dumps({**p, "compiled": compiled, "fit": {"flags": found["flags"], "compiles": found["compiles"],
                                                         "planned_bytes": found["planned_bytes"]}}))
    return
  if f.sample:
    batch = f.sample_batch or topology.chips
    compiled = tpu_compile.compile_sample(config, topology, batch)
    print(tpu_compile.format_compiled(compiled, None, f"sampling ({batch} prompts, {config.sample.steps} steps, "
                                                      f"guidance {config.sample.cfg})"))
    print(json.dumps({**p, "compiled": compiled}), flush=True)
  else:
    model_flops = (p["model_tflop_per_step"] + p["tower_tflop_per_step"] + p["autoencoder_tflop_per_step"]) * 1e12
    compiled = tpu_compile.compile_train_step(config, topology, model_flops / topology.chips)
    print(tpu_compile.format_compiled(compiled, p["bytes_per_device"]["total"]))
    print(json.dumps({**p, "compiled": compiled}), flush=True)
  if f.require_fit and not compiled["fits"]:
    over = compiled["peak_bytes"] - compiled["hbm_bytes"]
    raise cli.UserError(f"the {'sampling' if f.sample else 'train'} step does not fit {topology.name}: "
                        f"{compiled['peak_bytes'] / GiB:.2f} GiB per chip, {over / GiB:.2f} GiB over its "
                        f"{compiled['hbm_bytes'] // GiB} GiB HBM. Fix: add the overrides `--fit` prints "
                        "(remat, train.grad_accum, text.cache), or a larger slice")


if __name__ == "__main__":
  configs.define_flags()
  flags.declare_key_flag("config")
  flags.DEFINE_integer("devices", None, "Number of devices (default: the product of the mesh axes; needed "
                       "when an axis is -1).")
  flags.DEFINE_enum("chip", None, sorted(CHIP_PEAK_TFLOPS), "Chip, for the step time at --mfu.")
  flags.DEFINE_float("mfu", 0.4, "Model FLOP utilization assumed for the step time.")
  flags.DEFINE_string("topology", None, "Also compile the train step for this Cloud TPU slice here, no TPU needed "
                      "(libtpu: the test extra or `jax[tpu]`): v5p-128, v5litepod-256 / v5e-256, v6e-8, v4-128, "
                      "or v5p:4x4x4; or for NVIDIA GPU nodes, no GPU needed (`pip install jax-cuda12-plugin "
                      "jax-cuda12-pjrt` at jax's version): h100-64 (8 a node), h200-8, h100:2x8; reports the "
                      "compiled memory per chip against HBM.")
  flags.DEFINE_boolean("require_fit", False, "With --topology: exit with status 2 when the compiled step does "
                       "not fit the chips' HBM (launch/tpu_vm.sh runs this before it creates or uses a slice).")
  flags.DEFINE_boolean("sample", False, "With --topology: compile Pipeline's sampling function (config.sample: "
                       "steps, sampler, guidance) instead of the train step.")
  flags.DEFINE_integer("sample_batch", None, "With --sample: prompts per batch (default: one per chip).")
  flags.DEFINE_boolean("fit", False, "With --topology: find the cheapest remat policy, train.grad_accum (and "
                       "text.cache) that fit the slice (planner, confirmed by a compile) and print them as flags.")
  flags.DEFINE_integer("slices", 1, "With --topology: slices of it, joined over DCN (mesh.dcn_data unless the "
                       "config sets dcn axes).")
  cli.run(main)
