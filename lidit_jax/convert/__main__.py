"""Convert PyTorch checkpoints to Orbax, once, ahead of training.

  python -m lidit_jax.convert hf-text SRC_DIR OUT_DIR [--dtype bfloat16] [--allow-pickle]
  python -m lidit_jax.convert vae SRC OUT_DIR [--dtype float32] [--config config.json]

SRC_DIR is a local Hugging Face model directory (config.json + model.safetensors, or shards with their
index) of a decoder LLM (Llama, Mistral, Qwen2/3, Gemma 2), a T5 encoder or a CLIP text model. OUT_DIR
can then be used wherever a text tower is named (`--config.text.towers.NAME.init=OUT_DIR`).
For `vae`, SRC is a diffusers AutoencoderKL folder, a pipeline folder (its vae/ is read) or an original
single file (a whole SD checkpoint's first_stage_model.*, or a bare VAE file); `load_vae(OUT_DIR)` reads OUT_DIR.
Ends by printing one JSON line: family, parameter count, dtype, seconds, unused tensors.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax.numpy as jnp

from lidit_jax import cli


def stream(conv, fam, src: str, out: str, dtype, progress: bool = False):
  """(parameter count, unused keys) of a checked conversion (`conv`: expected, cfg, run, unused) written to OUT.
  Each parameter stays a host numpy array and goes to the Orbax writer as soon as it is complete (written while
  the next ones convert, then let go; jax Arrays would cost Orbax a second copy)."""
  import jax
  from lidit_jax.convert import orbax_io
  shapes = {p: jax.ShapeDtypeStruct(s.shape, dtype) for p, s in conv.expected.items()}
  orbax_io.stream_converted(out, src, fam, conv.cfg, dtype, shapes,
                            lambda sink: conv.run(dtype, progress=progress, as_numpy=True, sink=sink))
  return sum(math.prod(s.shape) for s in shapes.values()), conv.unused()


def convert_and_save(src: str, out: str, dtype, allow_pickle: bool = False, progress: bool = False):
  """(family, cfg, parameter count, unused keys) of a Hugging Face text model written to OUT."""
  from lidit_jax.convert import hf_text
  conv = hf_text.Conversion.prepare(src, dtype, allow_pickle)  # a mismatch fails here, before OUT is touched
  return (conv.fam, conv.cfg, *stream(conv, conv.fam, src, out, dtype, progress))


def convert_vae(src: str, out: str, dtype, config: str | None = None, progress: bool = False):
  from lidit_jax.convert import diffusers_vae
  conv = diffusers_vae.Conversion.prepare(src, dtype, config)
  return (diffusers_vae, conv.cfg, *stream(conv, diffusers_vae, src, out, dtype, progress))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lidit_jax.convert", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("hf-text", help="a Hugging Face text model (LLM, T5 encoder, CLIP text) -> Orbax",
                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", help="Hugging Face model directory (local; nothing is downloaded)")
  p.add_argument("out", help="output directory (must not hold a converted model yet)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                 help="storage dtype of the converted parameters (default: bfloat16, as frozen towers run)")
  p.add_argument("--allow-pickle", action="store_true",
                 help="accept pytorch_model.bin pickles (loaded with torch's weights_only mode)")
  cli.add_debug_flag(p)
  v = sub.add_parser("vae", help="a diffusers AutoencoderKL (folder, pipeline folder's vae/, or an original "
                     "single .safetensors file) -> Orbax", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  v.add_argument("src", help="VAE folder, pipeline folder, or single file (first_stage_model.* or bare encoder.*)")
  v.add_argument("out", help="output directory (must not hold a converted model yet)")
  v.add_argument("--dtype", default="float32", choices=("bfloat16", "float32", "float16"),
                 help="storage dtype (default: float32; SD's VAEs are run in float32, diffusers' force_upcast)")
  v.add_argument("--config", help="diffusers config.json of the weights (a single file's layout is otherwise "
                 "inferred from its shapes, with SD's norm groups and scaling factor)")
  cli.add_debug_flag(v)
  args = parser.parse_args(argv)

  from lidit_jax.convert import registry
  start = time.perf_counter()
  dtype = jnp.dtype(args.dtype)
  with cli.user_errors():
    if args.command == "vae":
      fam, cfg, count, unused = convert_vae(args.src, args.out, dtype, args.config, sys.stderr.isatty())
    else:
      fam, cfg, count, unused = convert_and_save(args.src, args.out, dtype, args.allow_pickle, sys.stderr.isatty())
  print(json.dumps({"out": args.out, "family": registry.describe(fam, cfg)["family"],
                    "params": count, "dtype": dtype.name,
                    "seconds": round(time.perf_counter() - start, 2), "unused_tensors": unused}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
