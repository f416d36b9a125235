"""FID feature extraction: our jitted FID Inception (`metrics.fid.FeatureExtractor`) against pytorch-fid's
`InceptionV3([3])`, same random weights, same images, on this machine.

  python -m benchmarks.fid_features [--images 16] [--batch_size 8]

Random weights (the speed does not depend on them), N random 299 x 299 images in [0, 1] (no resize on either side),
float32, batches of B. Each side runs one warm-up batch first (our compile), then one timed pass over the N images:
images per second, ratio = ours / torch (> 1: ours is faster), and the features' max difference over their scale.
torch runs under no_grad with every core. pytorch-fid and torchvision's Python modules are imported as in
tests/test_fid.py, from the folder it installs them into (torchvision's C ops do not load beside the CPU torch;
LIDIT_FID_REFERENCE or ~/.cache/lidit_jax/fid_reference). One JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytorch_fid_network():
  """pytorch-fid's InceptionV3([3]) with random weights, as tests/test_fid.py builds it (installing pytorch-fid into its
  own folder first if needed), nothing downloaded."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import test_fid  # the test extra's reference builder
  with test_fid._pytorch_fid_modules() as (inception, _):
    return test_fid.random_network(inception)


def measure(images: int, batch_size: int) -> dict:
  import torch
  from safetensors.torch import save_file
  from lidit_jax.metrics import fid
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  net = pytorch_fid_network()
  x = np.random.default_rng(0).uniform(0, 1, (images, 299, 299, 3)).astype(np.float32)
  batches = [x[i:i + batch_size] for i in range(0, images, batch_size)]
  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, "inception.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    ours = fid.FeatureExtractor(weights, batch_size=batch_size)

  def run_torch(b):
    with torch.no_grad():
      return net(torch.from_numpy(b).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()

  run_torch(batches[0])  # warm-up
  t = time.perf_counter()
  want = np.concatenate([run_torch(b) for b in batches])
  torch_s = time.perf_counter() - t
  ours(batches[0])  # compile
  t = time.perf_counter()
  got = np.concatenate([ours(b) for b in batches])
  ours_s = time.perf_counter() - t
  return {"images": images, "batch_size": batch_size, "torch_images_per_s": images / torch_s,
          "ours_images_per_s": images / ours_s, "ratio": torch_s / ours_s,
          "max_diff_over_scale": float(np.abs(got - want).max() / np.abs(want).max())}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--images", type=int, default=16)
  ap.add_argument("--batch_size", type=int, default=8)
  args = ap.parse_args()
  print(json.dumps({"fid_features": measure(args.images, args.batch_size)}), flush=True)


if __name__ == "__main__":
  main()
