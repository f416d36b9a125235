"""Image metrics from the command line, one JSON line each.

  python -m lidit_jax.metrics fid A B --inception WEIGHTS     A / B: image folders or .npz statistics
  python -m lidit_jax.metrics clip_score DIR --clip CLIP_DIR  DIR: a benchmark folder, or images + .txt captions
"""
from __future__ import annotations

import argparse
import json
import sys

from lidit_jax import cli
from lidit_jax.metrics import clip_score, fid


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lidit_jax.metrics", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_debug_flag(parser)
  sub = parser.add_subparsers(dest="command", required=True)
  for module in (fid, clip_score):
    module.add_parser(sub)  # each sets `run`: args -> a dict of results
  args = parser.parse_args(argv)
  with cli.user_errors():
    print(json.dumps(args.run(args)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
