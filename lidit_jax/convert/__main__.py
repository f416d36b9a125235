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
import sys
import time

import jax.numpy as jnp


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
  args = parser.parse_args(argv)

  from lidit_jax.convert import hf_text, orbax_io
  from lidit_jax.model import count_params
  start = time.perf_counter()
  dtype = jnp.dtype(args.dtype)
  try:
    fam, cfg, _, params, unused = hf_text.convert_hf_dir(args.src, dtype, allow_pickle=args.allow_pickle,
                                                         progress=sys.stderr.isatty())
    orbax_io.save_converted(args.out, args.src, fam, cfg, params, dtype)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"out": args.out, "family": hf_text.describe(fam, cfg)["family"],
                    "params": count_params(params), "dtype": dtype.name,
                    "seconds": round(time.perf_counter() - start, 2), "unused_tensors": unused}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
