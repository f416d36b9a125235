"""Export back to the PyTorch tools.

  python -m lidit_jax.export diffusers SRC OUT [--dtype float16]
  python -m lidit_jax.export diffusers SRC OUT.safetensors --format single-file
  python -m lidit_jax.export diffusers SRC OUT --merge-lora style.safetensors:0.8   # a LoRA merged in first
  python -m lidit_jax.export safetensors WORKDIR OUT.safetensors
  python -m lidit_jax.export lora WORKDIR OUT.safetensors       # a LoRA run's factors (`pipe.load_lora` reads it)

SRC is a Stable Diffusion or PixArt model: a diffusers pipeline folder, our converted one (`python -m
lidit_jax.convert diffusers`), or a training workdir that fine-tuned one (configs/sd15.py, pixart_sigma.py: its EMA
U-Net or transformer with the folder's text encoders, tokenizers, VAE and scheduler). OUT becomes a diffusers
pipeline folder: each component's config.json and safetensors weights (float32 unless --dtype), the tokenizers,
the scheduler's config and model_index.json, which diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline /
PixArtSigmaPipeline.from_pretrained load and sample to the same images (tests/test_pipeline.py, test_pixart.py).
With --format single-file (Stable Diffusion), OUT is one file in the
original CompVis / Stability / A1111 layout, which diffusers' `from_single_file` also loads. `safetensors` writes
a training workdir's model (LI-DiT or any family) in PyTorch layouts under documented keys (`export_safetensors`).
No torch is needed.

OUT is written under a temporary name beside it and renamed into place when complete, so a failed export (a full
disk) leaves nothing half-written. An existing OUT is replaced only when it is a previous output of the same command
(a folder holding EXPORT_MARKER, a file whose metadata names the command) or with --overwrite; anything else, the
source itself, and a workdir a live trainer holds are refused before anything is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_numpy  # save_file looked up per call (tests patch it)

from lidit_jax import cli, configs, denoisers, lock, lora, outputs, sharding, torch_view, checkpoint as ckpt_lib
from lidit_jax import model as model_lib, state as state_lib
from lidit_jax.cli import UserError
from lidit_jax.convert import safetensors_io
from lidit_jax.pipeline import Pipeline

# What marks a previous output of each command, so that running it again may replace it: a pipeline folder holds
# EXPORT_MARKER (model_index.json alone would also match a user's downloaded pipeline); a file's metadata names it.
EXPORT_MARKER = "lidit_exported.json"
METADATA_KEY = "lidit_jax.export"


def _exported_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, EXPORT_MARKER)) and os.path.isfile(os.path.join(path, "model_index.json"))


def _exported_file(kind: str):
  return lambda path: (safetensors_io.metadata(path) or {}).get(METADATA_KEY) == kind


# {format: (what marks a previous output, what that is)}
OUTPUTS = {"diffusers": (_exported_folder, "a pipeline folder written by `export diffusers`"),
           "single-file": (_exported_file("single-file"), "a file written by `export diffusers --format single-file`"),
           "safetensors": (_exported_file("safetensors"), "a file written by `export safetensors`"),
           "lora": (_exported_file("lora"), "a file written by `export lora`")}


def check_out(kind: str, out: str, overwrite: bool = False, sources=()) -> None:
  """Refuse OUT before anything is loaded: the source itself (a workdir may hold its own exports), a workdir a live
  trainer holds, an existing path that is not a previous output of `kind` (unless `overwrite`)."""
  outputs.check_apart(out, sources, allow_inside=True)
  lock.refuse_if_held(out, "an export")
  outputs.check_target(out, overwrite, *OUTPUTS[kind])


def _staged(kind: str, out: str, overwrite: bool, state_bytes: int):
  check_out(kind, out, overwrite)
  return outputs.staged(out, overwrite, *OUTPUTS[kind], need_bytes=state_bytes)


def _nbytes(tree, dtype) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree)) * np.dtype(dtype).itemsize


def _cast(state: dict, dtype) -> dict:
  """`state` in `dtype`, entry by entry (each float32 array is let go as its copy is made: one tensor extra)."""
  for k in list(state):
    state[k] = np.ascontiguousarray(np.asarray(state[k]).astype(dtype, copy=False))
  return state


def _save(directory: str, config: dict, state: dict, weights: str, dtype) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  safetensors_numpy.save_file(_cast(state, dtype), os.path.join(directory, weights), metadata={"format": "pt"})


def _family(config, what: str):
  """The denoiser family's module, which knows its pipeline layout, or a clear error for one that has none."""
  family = denoisers.family(config)
  if not hasattr(family, what):
    raise cli.UserError(f"model.family={config.model.family!r} has no released pipeline layout to export to. "
                        "Fix: `python -m lidit_jax.export safetensors` writes any model")
  return family


def export_diffusers(backend, out: str, dtype=np.float32, overwrite: bool = False) -> str:
  """Write a pipeline's model (`Pipeline.backend`: a pipeline folder or a workdir fine-tuning one) to `out` as a
  diffusers pipeline folder, in the family's layout (atomically; see the module docstring for what may be
  replaced)."""
  family = _family(backend.setup.config, "export_pipeline")
  save = lambda directory, config, state, weights: _save(directory, config, state, weights, dtype)
  with _staged("diffusers", out, overwrite, _nbytes(backend.params, dtype)) as tmp:
    family.export_pipeline(backend, tmp, save)
    with open(os.path.join(tmp, EXPORT_MARKER), "w", encoding="utf-8") as f:
      json.dump({"command": "python -m lidit_jax.export diffusers", "dtype": np.dtype(dtype).name}, f, indent=2)
  return out


def export_single_file(backend, out: str, dtype=np.float32, overwrite: bool = False) -> str:
  """Write a pipeline's model to the file `out` in its family's original single-file layout (Stable Diffusion:
  what A1111, ComfyUI and diffusers' `from_single_file` read)."""
  check_out("single-file", out, overwrite)
  state = _cast(_family(backend.setup.config, "single_file_state").single_file_state(backend, out), dtype)
  with _staged("single-file", out, overwrite, _nbytes(state, dtype)) as tmp:
    safetensors_numpy.save_file(state, tmp, metadata={"format": "pt", METADATA_KEY: "single-file"})
  return out


def workdir_backend(workdir: str):
  """A training workdir's model (EMA weights of its latest checkpoint) as a `Pipeline` backend; a model its family
  cannot export (`exportable`) is refused by name before anything is loaded."""
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    ckpt_lib.require(workdir).close()  # its clear error: no run here
  config = configs.read_saved(workdir)
  _family(config, "export_pipeline").exportable(config, workdir)
  ckpt_lib.require(workdir).close()
  return Pipeline.from_pretrained(workdir, dtype=jnp.float32).backend


# ------------------------------------------------------------------ a workdir's model as PyTorch-layout safetensors

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_layout(names: tuple, value: np.ndarray, path: tuple[str, ...], layer: int | None = None) -> dict:
  """{key: tensor} of one parameter in the documented layout (see `export_safetensors`)."""
  if names and names[0] == "layers":  # a scanned stack: one tensor per layer, as the unrolled model names them
    return {k: v for i in range(value.shape[0]) for k, v in torch_layout(names[1:], value[i], path, i).items()}
  leaf = path[-1]
  key = f"{torch_view.module_key(path, layer)}.{_LEAF.get(leaf, leaf)}"
  if leaf == "kernel" and value.ndim >= 2:  # a conv HWIO -> OIHW, a Dense (heads split or not) -> Linear [out, in]
    value = torch_view.to_torch(names, value)
  elif leaf == "bias" and value.ndim > 1:  # per-head biases [H, K]
    value = value.reshape(-1)
  return {key: np.ascontiguousarray(value)}


def model_axis_names(config) -> dict[tuple[str, ...], tuple]:
  """{parameter path: logical axis names} of the config's trainable model (nothing computed)."""
  m = model_lib.build_model(config)
  boxed = jax.eval_shape(lambda kw: m.init(jax.random.key(0), **kw), model_lib.abstract_inputs(config, 1))["params"]
  return sharding.axis_names(boxed)


def export_safetensors(workdir: str, out: str, dtype=np.float32, overwrite: bool = False) -> str:
  """The EMA weights of a training workdir's latest checkpoint (any family) as one safetensors file that PyTorch
  reads (`safetensors.torch.load_file`). Keys: the parameter's path joined by "." with `kernel` / `scale` /
  `embedding` named `weight`; a scanned stack (the DiT's `blocks`) written per layer as `blocks.{i}.`. Layouts:
  Dense kernels as torch Linear weights [out, in] (attention projections with their heads flattened: q / k / v
  [H*K, D], the output [D, H*K], per-head biases [H*K]); conv kernels OIHW; everything else as stored. The frozen
  text towers and the autoencoder are not in it (they come from their own checkpoints). Metadata: `format`
  "pt", `lidit_jax.config` (the workdir's config JSON), `lidit_jax.step` and `lidit_jax.export` ("safetensors",
  so that a later export may replace the file; anything else there is refused unless `overwrite`)."""
  check_out("safetensors", out, overwrite, [workdir])
  ckpt_lib.require(workdir).close()  # a clear error before anything is built
  pipe = Pipeline.from_pretrained(workdir)
  backend = pipe.backend
  names = model_axis_names(backend.setup.config)
  flat = {tuple(k.key for k in p): np.asarray(v, np.float32)
          for p, v in jax.tree_util.tree_flatten_with_path(backend.params["model"])[0]}
  state = {}
  for path, value in flat.items():
    state.update(torch_layout(names[path], value, path))
  state = _cast(state, dtype)
  meta = {"format": "pt", "lidit_jax.config": backend.setup.config.to_json_best_effort(),
          "lidit_jax.step": str(backend.step), METADATA_KEY: "safetensors"}
  with _staged("safetensors", out, overwrite, _nbytes(state, dtype)) as tmp:
    safetensors_numpy.save_file(state, tmp, metadata=meta)
  return out


def export_lora(workdir: str, out: str, fmt: str = "diffusers", overwrite: bool = False) -> str:
  """The EMA factors of a LoRA run's latest checkpoint (`lora.rank` > 0) as one safetensors file in a layout
  `lora` documents: diffusers' / peft's ("{module}.lora_A.weight", "{module}.lora_B.weight", alpha in
  `lora_adapter_metadata`) or kohya's ("lora_{module}.lora_down.weight", "lora_up", ".alpha"); the U-Net family's
  modules under diffusers' names (`unet.down_blocks.0...`), the others under `export safetensors`' (a stack's pairs
  one per layer). Nothing of the base is read or written."""
  if fmt not in lora.FORMATS:
    raise UserError(f"format={fmt!r}: not a LoRA layout. Fix: pass one of {', '.join(lora.FORMATS)}")
  check_out("lora", out, overwrite, [workdir])
  ckpt = ckpt_lib.require(workdir)
  config = configs.read_saved(workdir)
  if not config.lora.rank:
    ckpt.close()
    raise UserError(f"{workdir} is not a LoRA run (lora.rank=0). Fix: export its whole model with `export "
                    "safetensors` or `export diffusers`, or train one with --config.lora.rank=16")
  s = state_lib.setup(config, abstract=True, training=False)  # the factors' shapes: no tower or base is loaded
  state, _ = ckpt.restore(s.abstract_state)
  step = int(state.step)
  ckpt.close()
  tensors, meta = lora.to_file(state.ema_params, s.lora.kernels, s.lora.alpha, denoisers.lora_names(config), fmt)
  meta.update({"format": "pt", "lidit_jax.config": config.to_json_best_effort(), "lidit_jax.step": str(step),
               METADATA_KEY: "lora"})
  with _staged("lora", out, overwrite, _nbytes(tensors, np.float32)) as tmp:
    safetensors_numpy.save_file(tensors, tmp, metadata=meta)
  return out


def _add_overwrite_flag(parser):
  parser.add_argument("--overwrite", action="store_true",
                      help="replace OUT whatever it holds (atomically: the old OUT goes once the new one is complete)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lidit_jax.export", description=__doc__.split("\n\n")[0],
                                   epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  d = sub.add_parser("diffusers", help="a Stable Diffusion model -> a diffusers pipeline folder")
  d.add_argument("src", help="diffusers pipeline folder, our converted one, or a workdir fine-tuning one")
  d.add_argument("out", help="new output directory (a new .safetensors file with --format single-file)")
  d.add_argument("--format", default="diffusers", choices=("diffusers", "single-file"),
                 help="a diffusers pipeline folder, or one file in the original layout")
  d.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="weights' storage dtype")
  d.add_argument("--merge-lora", action="append", default=[], metavar="PATH[:SCALE]",
                 help="a LoRA file (diffusers' / peft's or kohya's layout) merged into the U-Net and text encoders "
                 "first, times SCALE (default 1); repeatable, they stack")
  _add_overwrite_flag(d)
  cli.add_debug_flag(d)
  t = sub.add_parser("safetensors", help="a training workdir's model (EMA weights, any family) -> one safetensors "
                     "file in PyTorch layouts (keys documented in export_safetensors)")
  t.add_argument("src", help="training workdir (config.json + checkpoints/)")
  t.add_argument("out", help="new .safetensors file")
  t.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="weights' storage dtype")
  _add_overwrite_flag(t)
  cli.add_debug_flag(t)
  r = sub.add_parser("lora", help="a LoRA run's factors (EMA) -> one safetensors LoRA file")
  r.add_argument("src", help="training workdir of a LoRA run (lora.rank > 0)")
  r.add_argument("out", help="new .safetensors file")
  r.add_argument("--format", default="diffusers", choices=lora.FORMATS,
                 help="diffusers / peft keys (`load_lora_weights`), or kohya's (`lora_unet_...lora_down`, A1111, "
                 "ComfyUI); `Pipeline.load_lora` reads both")
  _add_overwrite_flag(r)
  cli.add_debug_flag(r)
  args = parser.parse_args(argv)
  with cli.user_errors():
    if args.command in ("safetensors", "lora"):
      if args.command == "safetensors":
        export_safetensors(args.src, args.out, np.dtype(args.dtype), args.overwrite)
      else:
        export_lora(args.src, args.out, args.format, args.overwrite)
      print(json.dumps({"out": args.out, "format": args.command}))
      return 0
    check_out(args.format, args.out, args.overwrite, [args.src])  # before the model is loaded
    loras = [lora.parse_arg(a, "--merge-lora") for a in args.merge_lora]
    if os.path.isfile(os.path.join(args.src, "model_index.json")):
      backend = Pipeline.from_pretrained(args.src).backend
    else:
      backend = workdir_backend(args.src)
    pipe = Pipeline(backend)
    for path, scale in loras:
      try:
        pipe.load_lora(path, scale)
      except ValueError as e:  # a LoRA for another model: the user's to fix
        raise UserError(f"--merge-lora {path}: {e}") from e
    backend = pipe.backend
    write = export_diffusers if args.format == "diffusers" else export_single_file
    write(backend, args.out, np.dtype(args.dtype), args.overwrite)
  print(json.dumps({"out": args.out, "format": args.format}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
