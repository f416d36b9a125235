"""Convert PyTorch checkpoints to Orbax, once, ahead of training.

  python -m lidit_jax.convert hf-text SRC_DIR OUT_DIR [--dtype bfloat16] [--allow-pickle]
  python -m lidit_jax.convert vae SRC OUT_DIR [--dtype float32] [--config config.json]
  python -m lidit_jax.convert diffusers SRC OUT_DIR [--dtype float32]
  python -m lidit_jax.convert single-file SRC.safetensors OUT_DIR --config PIPELINE_DIR [--ema] [--kind sd15]

SRC_DIR is a local Hugging Face model directory (config.json + model.safetensors, or shards with their
index) of a decoder LLM (Llama, Mistral, Qwen2/3, Gemma 2), a T5 encoder or a CLIP text model. OUT_DIR
can then be used wherever a text tower is named (`--config.text.towers.NAME.init=OUT_DIR`).
For `vae`, SRC is a diffusers AutoencoderKL folder, a pipeline folder (its vae/ is read) or an original
single file (a whole SD checkpoint's first_stage_model.*, or a bare VAE file); `load_vae(OUT_DIR)` reads OUT_DIR.
For `diffusers`, SRC is a Stable Diffusion 1.x / 2.x / XL or PixArt-alpha / Sigma pipeline folder: its U-Net or
transformer, VAE and text encoders are converted into OUT_DIR's unet/ or transformer/, vae/, text_encoder(_2)/, its
tokenizers, scheduler and model_index.json copied;
`Pipeline.from_pretrained(OUT_DIR)` reads it with nothing left to convert (`python -m lidit_jax.export diffusers`
writes it back). `single-file` does the same for an original SD 1.x / 2.x / XL checkpoint (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*` or `conditioner.embedders.*`; `model_ema.*` with --ema), laid out by
--config, a diffusers folder of the same model (its configs, tokenizers and scheduler).
Ends by printing one JSON line: family, parameter count, dtype, seconds, unused tensors.

OUT_DIR is written under a temporary name beside it and renamed into place when complete: a failed conversion (a
full disk) leaves nothing half-written. An existing OUT_DIR is replaced only when it holds a previous conversion
of the same kind (lidit_converted.json; for diffusers / single-file, a converted pipeline folder) or with
--overwrite; anything else, an OUT_DIR that is, holds or lies in the source, and a workdir a live trainer holds are
refused before anything is written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp

from lidit_jax import checkpoint, cli, denoisers, lock, outputs
from lidit_jax.convert import diffusers_unet
from lidit_jax.convert import diffusers_vae
from lidit_jax.convert import hf_clip
from lidit_jax.convert import hf_text
from lidit_jax.convert import orbax_io
from lidit_jax.convert import registry
from lidit_jax.convert import sd_single_file
from lidit_jax.convert import safetensors_io as io


def _converted(*families: str):
  """Whether a directory holds a previous conversion into one of `families` (so converting again may replace it)."""
  return lambda path: registry.marker(path) is not None and registry.read_marker(path).get("family") in families


def _converted_pipeline(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "model_index.json")) and any(
      registry.marker(os.path.join(path, part)) is not None for part in ("unet", "transformer"))


# {command: (what marks a previous output, what that is)}
OUTPUTS = {"hf-text": (_converted("hf_llm", "hf_t5", "hf_clip"), "a converted text model (lidit_converted.json)"),
           "vae": (_converted("diffusers_vae"), "a converted VAE (lidit_converted.json)"),
           "pipeline": (_converted_pipeline, "a converted pipeline folder (model_index.json, unet/lidit_converted.json)")}


def check_out(kind: str, out: str, sources, overwrite: bool = False) -> None:
  """Refuse OUT before anything is written: one that is, holds or lies in a source, a workdir a live trainer holds,
  an existing path that is not a previous output of `kind` (unless `overwrite`)."""
  outputs.check_apart(out, sources)
  lock.refuse_if_held(out, "a conversion")
  outputs.check_target(out, overwrite, *OUTPUTS[kind])


def _staged(kind: str, out: str, overwrite: bool, convs, dtype):
  """outputs.staged for OUT, sized by the checked conversions `convs`."""
  need = sum(math.prod(s.shape) for conv in convs for s in conv.expected.values()) * jnp.dtype(dtype).itemsize
  return outputs.staged(out, overwrite, *OUTPUTS[kind], need_bytes=need)


def stream(conv, fam, src: str, out: str, dtype, progress: bool = False):
  """(parameter count, unused keys) of a checked conversion (`conv`: expected, cfg, run, unused) written to OUT, a
  new directory. Each parameter stays a host numpy array and goes to the Orbax writer as soon as it is complete
  (written while the next ones convert, then let go; jax Arrays would cost Orbax a second copy)."""
  shapes = {p: jax.ShapeDtypeStruct(s.shape, dtype) for p, s in conv.expected.items()}
  orbax_io.stream_converted(out, src, fam, conv.cfg, dtype, shapes,
                            lambda sink: conv.run(dtype, progress=progress, as_numpy=True, sink=sink))
  return sum(math.prod(s.shape) for s in shapes.values()), conv.unused()


def convert_and_save(src: str, out: str, dtype, allow_pickle: bool = False, progress: bool = False,
                     overwrite: bool = False):
  """(family, cfg, parameter count, unused keys) of a Hugging Face text model written to OUT."""
  check_out("hf-text", out, [src], overwrite)
  conv = hf_text.Conversion.prepare(src, dtype, allow_pickle)  # a mismatch fails here, before OUT is touched
  with _staged("hf-text", out, overwrite, [conv], dtype) as tmp:
    return (conv.fam, conv.cfg, *stream(conv, conv.fam, src, tmp, dtype, progress))


def convert_vae(src: str, out: str, dtype, config: str | None = None, progress: bool = False, overwrite: bool = False):
  check_out("vae", out, [src] + ([config] if config else []), overwrite)
  conv = diffusers_vae.Conversion.prepare(src, dtype, config)
  with _staged("vae", out, overwrite, [conv], dtype) as tmp:
    return (diffusers_vae, conv.cfg, *stream(conv, diffusers_vae, src, tmp, dtype, progress))


def _read_index(folder: str) -> dict:
  path = os.path.join(folder, "model_index.json")
  if not os.path.isfile(path):
    raise cli.NotFound(f"{path} does not exist. Fix: point at a diffusers pipeline folder")
  return io.read_json(path)


def _text_encoders(index: dict):
  """(name, model_index class name) of a pipeline's text encoders."""
  return [(n, index[n][1]) for n in ("text_encoder", "text_encoder_2") if index.get(n) and index[n][0] is not None]


def convert_pipeline(src: str, out: str, dtype, progress: bool = False, overwrite: bool = False):
  """{component: (family, cfg, parameter count, unused keys)} of a diffusers pipeline folder a denoiser family
  reads (Stable Diffusion 1.x / 2.x / XL, PixArt-alpha / Sigma) converted to OUT. Every component is checked
  before OUT is touched."""
  check_out("pipeline", out, [src], overwrite)
  index = _read_index(src)
  parts = denoisers.pipeline_parts(src, dtype)
  if parts is None:
    raise cli.UserError(f"{src}/model_index.json: class {index.get('_class_name')!r}, whose denoiser no family here "
                        "reads. Fix: point at a Stable Diffusion 1.x / 2.x / XL or PixArt-alpha / Sigma pipeline folder")
  return _write_pipeline(parts, {n: os.path.join(src, n) for n in parts}, src, index, out, dtype, progress, overwrite)


def convert_single_file(src: str, out: str, dtype, config: str, kind: str | None = None, ema: bool = False,
                        progress: bool = False, overwrite: bool = False):
  """The same as `convert_pipeline` for an original SD 1.x / 2.x / XL checkpoint file (`model.diffusion_model.*`,
  `first_stage_model.*`, the text encoders of `sd_single_file`): the diffusers pipeline folder `config` gives
  the components' configs, the tokenizers, the scheduler and model_index.json (its weights are not read)."""
  if not os.path.isfile(src):
    raise cli.NotFound(f"{src} is not a file. Fix: point at the checkpoint's .safetensors file")
  io.require_safetensors(src)
  check_out("pipeline", out, [src, config], overwrite)
  index = _read_index(config)
  found = diffusers_unet.detect_kind(io.CheckpointFiles(src))
  if kind is not None and kind != found:
    raise cli.UserError(f"--kind {kind}: {src} holds an {found} checkpoint (its keys say). Fix: --kind {found}")
  parts = {"unet": (diffusers_unet, diffusers_unet.Conversion.prepare(src, dtype, config, found, ema)),
           "vae": (diffusers_vae, diffusers_vae.Conversion.prepare(src, dtype, os.path.join(config, "vae", "config.json")))}
  classes = dict(_text_encoders(index))
  for name, prefix, layout in sd_single_file.TEXT_ENCODERS[found]:
    if name not in classes:
      raise cli.UserError(f"{config}/model_index.json has no {name} for this {found} checkpoint. Fix: --config a "
                          f"diffusers folder of the same kind of model")
    hf_config = io.read_json(os.path.join(config, name, "config.json"))
    parts[name] = (hf_clip, sd_single_file.TextPart.prepare(src, hf_config, classes[name], prefix, layout, dtype))
  return _write_pipeline(parts, {n: src for n in parts}, config, index, out, dtype, progress, overwrite)


def _write_pipeline(parts: dict, sources: dict, folder: str, index: dict, out: str, dtype, progress: bool,
                    overwrite: bool):
  """Checked conversions `parts` ({component: (family, conversion)}) streamed into OUT's component folders, then
  `folder`'s tokenizers, scheduler and model_index.json (`index`) copied; all under a temporary name."""
  with _staged("pipeline", out, overwrite, [conv for _, conv in parts.values()], dtype) as tmp:
    done = {name: (fam, conv.cfg, *stream(conv, fam, sources[name], os.path.join(tmp, name), dtype, progress))
            for name, (fam, conv) in parts.items()}
    for name in index:  # what needs no conversion
      if (name.startswith("tokenizer") or name == "scheduler") and os.path.isdir(os.path.join(folder, name)):
        shutil.copytree(os.path.join(folder, name), os.path.join(tmp, name))
    shutil.copy(os.path.join(folder, "model_index.json"), os.path.join(tmp, "model_index.json"))
  return done


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lidit_jax.convert", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  def command(name, help, src, dtype="float32", dtype_help="storage dtype of every component (default: float32)"):
    c = sub.add_parser(name, help=help, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("src", help=src)
    c.add_argument("out", help="output directory (new, or a previous conversion of the same kind, replaced)")
    c.add_argument("--dtype", default=dtype, choices=("bfloat16", "float32", "float16"), help=dtype_help)
    c.add_argument("--overwrite", action="store_true", help="replace OUT whatever it holds (atomically: the old "
                   "OUT goes once the new one is complete)")
    cli.add_debug_flag(c)
    return c

  p = command("hf-text", "a Hugging Face text model (LLM, T5 encoder, CLIP text) -> Orbax",
              "Hugging Face model directory (local; nothing is downloaded)", "bfloat16",
              "storage dtype of the converted parameters (default: bfloat16, as frozen towers run)")
  p.add_argument("--allow-pickle", action="store_true",
                 help="accept pytorch_model.bin pickles (loaded with torch's weights_only mode)")
  v = command("vae", "a diffusers AutoencoderKL (folder, pipeline folder's vae/, or an original single .safetensors "
              "file) -> Orbax", "VAE folder, pipeline folder, or single file (first_stage_model.* or bare encoder.*)",
              dtype_help="storage dtype (default: float32; SD's VAEs are run in float32, diffusers' force_upcast)")
  v.add_argument("--config", help="diffusers config.json of the weights (a single file's layout is otherwise "
                 "inferred from its shapes, with SD's norm groups and scaling factor)")
  command("diffusers", "a diffusers Stable Diffusion or PixArt pipeline folder -> a folder of Orbax components that "
          "Pipeline.from_pretrained reads", "pipeline folder (model_index.json, unet/, vae/, text_encoder(_2)/, "
          "tokenizer(_2)/, scheduler/)")
  f = command("single-file", "an original SD 1.x / 2.x / XL checkpoint file (CompVis / A1111 layout) -> a folder of Orbax "
              "components that Pipeline.from_pretrained reads", "the checkpoint's .safetensors file")
  f.add_argument("--config", required=True, help="a diffusers pipeline folder of the same model (configs, "
                 "tokenizers, scheduler; weights not needed): nothing is downloaded")
  f.add_argument("--kind", choices=("sd15", "sd2", "sdxl"), help="the checkpoint's kind (default: from its keys)")
  f.add_argument("--ema", action="store_true", help="the U-Net's EMA weights (model_ema.*) instead of its own")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  dtype = jnp.dtype(args.dtype)
  progress = sys.stderr.isatty()
  checkpoint.quiet_orbax_failures()
  with cli.user_errors():
    if args.command in ("diffusers", "single-file"):
      parts = (convert_pipeline(args.src, args.out, dtype, progress, args.overwrite) if args.command == "diffusers"
               else convert_single_file(args.src, args.out, dtype, args.config, args.kind, args.ema, progress,
                                        args.overwrite))
      print(json.dumps({"out": args.out, "components": {k: {"family": registry.describe(v[0], v[1])["family"],
                                                             "params": v[2], "unused_tensors": v[3]}
                                                         for k, v in parts.items()},
                        "dtype": dtype.name, "seconds": round(time.perf_counter() - start, 2)}))
      return 0
    if args.command == "vae":
      fam, cfg, count, unused = convert_vae(args.src, args.out, dtype, args.config, progress, args.overwrite)
    else:
      fam, cfg, count, unused = convert_and_save(args.src, args.out, dtype, args.allow_pickle, progress,
                                                 args.overwrite)
  print(json.dumps({"out": args.out, "family": registry.describe(fam, cfg)["family"],
                    "params": count, "dtype": dtype.name,
                    "seconds": round(time.perf_counter() - start, 2), "unused_tensors": unused}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
