"""Convert PyTorch checkpoints to Orbax, once, ahead of training.

  python -m lidit_jax.convert hf-text SRC_DIR OUT_DIR [--dtype bfloat16] [--allow-pickle]

SRC_DIR is a local Hugging Face model directory (config.json + model.safetensors, or shards with their
index) of a decoder LLM (Llama, Mistral, Qwen2/3, Gemma 2), a T5 encoder or a CLIP text model. OUT_DIR
can then be used wherever a text tower is named (`--config.text.towers.NAME.init=OUT_DIR`).
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


def convert_and_save(src: str, out: str, dtype, allow_pickle: bool = False, progress: bool = False):
  """(family, cfg, parameter count, unused keys). Each parameter stays a host numpy array and goes to the
  Orbax writer as soon as it is complete (written while the next ones convert, then let go; jax Arrays
  would cost Orbax a second copy)."""
  import jax
  from lidit_jax.convert import hf_text, orbax_io
  conv = hf_text.Conversion.prepare(src, dtype, allow_pickle)  # a mismatch fails here, before OUT is touched
  shapes = {p: jax.ShapeDtypeStruct(s.shape, dtype) for p, s in conv.expected.items()}
  orbax_io.stream_converted(out, src, conv.fam, conv.cfg, dtype, shapes,
                            lambda sink: conv.run(dtype, progress=progress, as_numpy=True, sink=sink))
  return conv.fam, conv.cfg, sum(math.prod(s.shape) for s in shapes.values()), conv.unused()


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
  args = parser.parse_args(argv)

  from lidit_jax.convert import hf_text
  start = time.perf_counter()
  dtype = jnp.dtype(args.dtype)
  with cli.user_errors():
    fam, cfg, count, unused = convert_and_save(args.src, args.out, dtype, args.allow_pickle, sys.stderr.isatty())
  print(json.dumps({"out": args.out, "family": hf_text.describe(fam, cfg)["family"],
                    "params": count, "dtype": dtype.name,
                    "seconds": round(time.perf_counter() - start, 2), "unused_tensors": unused}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
