"""Images per second of the benchmark writer (`python -m lidit_jax.benchmark`) on this machine.

  python -m benchmarks.benchmark_writer [--prompts 8] [--batch_size 16]

Two models: the shapes demo's config (untrained: the speed does not depend on the weights; 32 px, its sampler and
steps) and a tiny random SD 1.x pipeline folder written by the test suite's builder (diffusers' classes, 64 px,
PNDM, its 50 steps). Each writes a GenEval folder (4 images per prompt) twice into fresh folders with one
Pipeline: the first run includes compilation, the second is the steady state; the same prompts and seed, so the
second run's images equal the first's (checked). One JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

from lidit_jax import benchmark
from lidit_jax.pipeline import Pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "above", "left of"]


def prompt_file(folder: str, n: int) -> str:
  rng = np.random.default_rng(0)
  path = os.path.join(folder, "evaluation_metadata.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(n):
      f.write(json.dumps({"tag": "bench", "prompt": " ".join(rng.choice(WORDS, 5))}) + "\n")
  return path


def measure(pipe: Pipeline, prompts: str, folder: str, batch_size: int) -> dict:
  runs = [benchmark.write(pipe, "geneval", prompts, os.path.join(folder, name), batch_size=batch_size,
                          progress=False) for name in ("first", "second")]
  a, b = (os.path.join(folder, n, "00000", "samples", "0000.png") for n in ("first", "second"))
  assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), "the same settings gave other images"
  return {"images": runs[1]["images"], "steps": pipe.defaults["num_steps"],
          "size": f"{pipe.defaults['height']}x{pipe.defaults['width']}",
          "first_run_images_per_second": runs[0]["images_per_second"],
          "images_per_second": runs[1]["images_per_second"]}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--batch_size", type=int, default=16)
  args = ap.parse_args()
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import test_pipeline  # the tiny SD 1.x folder builder (diffusers, torch: the test extra)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    prompts = prompt_file(tmp, args.prompts)
    out["shapes_demo"] = measure(Pipeline.from_pretrained(os.path.join(ROOT, "configs", "shapes.py")), prompts,
                                 os.path.join(tmp, "shapes"), args.batch_size)
    folder = os.path.join(tmp, "sd15")
    test_pipeline.sd15(folder)  # saves the folder
    out["tiny_sd15_folder"] = measure(Pipeline.from_pretrained(folder), prompts, os.path.join(tmp, "sd"),
                                      args.batch_size)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
