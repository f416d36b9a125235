"""The VAE against diffusers' PyTorch AutoencoderKL (same weights, one run), and its conversion's cost.

  python -m benchmarks.vae [--size 256] [--reps 3] [--quick] [--no-record]

1. A random SD-layout AutoencoderKL (block widths 128/256/512/512, 2 layers per block, 4 latent channels: 83.7 M
   parameters, as SD 1.x / 2.x / SDXL) saved by diffusers, loaded by `load_vae`; float32, batch 1. Median seconds
   of encode (the posterior mean) and of decode at --size px, torch under no_grad against our jitted apply
   (compiled before timing); ratio = torch / ours (> 1: ours is faster).
2. `python -m lidit_jax.convert vae SRC OUT` in a subprocess: wall seconds, and its peak RSS against the file's
   bytes, with the RSS of a process that only imports jax and lidit_jax.convert beside it.
Prints one JSON line; unless --quick / --no-record, adds a dated table to benchmarks/RESULTS.md. --quick: a small
layout at 64 px, to check the script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32)
QUICK = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32)


def speed(src: str, size: int, reps: int) -> dict:
  import diffusers
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from benchmarks.vs_torch import _median_time
  from lidit_jax.convert import load_vae
  ref = diffusers.AutoencoderKL.from_pretrained(src).eval()
  module, params = load_vae(src)
  f = module.cfg.downsample_factor
  x = np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
  z = np.random.default_rng(1).normal(size=(1, size // f, size // f, module.cfg.latent_channels)).astype(np.float32)
  enc = jax.jit(lambda p, a: module.apply({"params": p}, a, method="encode"))
  dec = jax.jit(lambda p, a: module.apply({"params": p}, a, method="decode"))
  xj, zj = jnp.asarray(x), jnp.asarray(z)
  enc(params, xj).block_until_ready(), dec(params, zj).block_until_ready()  # compile
  xt, zt = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(z).permute(0, 3, 1, 2)
  with torch.no_grad():
    ref.encode(xt), ref.decode(zt)  # warm up
    out = {"torch_encode_s": _median_time(lambda: ref.encode(xt).latent_dist.mean, reps),
           "torch_decode_s": _median_time(lambda: ref.decode(zt).sample, reps)}
  out["ours_encode_s"] = _median_time(lambda: enc(params, xj).block_until_ready(), reps)
  out["ours_decode_s"] = _median_time(lambda: dec(params, zj).block_until_ready(), reps)
  out["encode_ratio"] = out["torch_encode_s"] / out["ours_encode_s"]
  out["decode_ratio"] = out["torch_decode_s"] / out["ours_decode_s"]
  out["params"] = sum(p.numel() for p in ref.parameters())
  return out


def _child_peak_mb(args: list[str]) -> tuple[float, float]:
  """(wall seconds, peak RSS MiB) of a child process (its own, measured by a fresh wrapper interpreter)."""
  code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
          "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
          "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, r.returncode)")
  out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout.split()
  if out[2] != "0":
    raise RuntimeError(f"{args} failed (exit {out[2]})")
  return float(out[0]), float(out[1])


def conversion(src: str, workdir: str) -> dict:
  file_mb = os.path.getsize(os.path.join(src, "diffusion_pytorch_model.safetensors")) / 2 ** 20
  seconds, peak = _child_peak_mb([sys.executable, "-m", "lidit_jax.convert", "vae", src, os.path.join(workdir, "out")])
  _, baseline = _child_peak_mb([sys.executable, "-c", "import jax, lidit_jax.convert"])
  return {"convert_s": seconds, "file_mb": file_mb, "peak_rss_mb": peak, "import_rss_mb": baseline,
          "peak_over_file": peak / file_mb, "peak_minus_imports_over_file": (peak - baseline) / file_mb}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--no-record", action="store_true")
  a = p.parse_args(argv)
  if a.size % 8 or a.size <= 0 or a.reps <= 0:
    p.error(f"--size {a.size} / --reps {a.reps}: the size must be a positive multiple of 8, reps positive")
  import diffusers
  import torch
  layout, size = (QUICK, 64) if a.quick else (SD, a.size)
  with tempfile.TemporaryDirectory() as tmp:
    torch.manual_seed(0)
    n = len(layout["block_out_channels"])
    diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            **layout).save_pretrained(os.path.join(tmp, "vae"))
    result = {"size": size, **speed(os.path.join(tmp, "vae"), size, a.reps), **conversion(os.path.join(tmp, "vae"), tmp),
              "torch_threads": torch.get_num_threads()}
  print(json.dumps(result))
  if not (a.quick or a.no_record):
    from benchmarks.learning_curve import machine_line, write_section
    r = result
    lines = [machine_line(f"SD-layout VAE, {r['params'] / 1e6:.1f} M params, float32, batch 1, {size} px"),
             "| figure | ours | diffusers (torch) | torch / ours |\n|---|---|---|---|\n",
             f"| encode (posterior mean) | {r['ours_encode_s']:.3f} s | {r['torch_encode_s']:.3f} s | "
             f"{r['encode_ratio']:.2f} |\n",
             f"| decode | {r['ours_decode_s']:.3f} s | {r['torch_decode_s']:.3f} s | {r['decode_ratio']:.2f} |\n",
             f"\nConversion (`convert vae`, {r['file_mb']:.0f} MiB file): {r['convert_s']:.1f} s, peak RSS "
             f"{r['peak_rss_mb']:.0f} MiB = {r['peak_over_file']:.2f}x the file ({r['peak_minus_imports_over_file']:.2f}x "
             f"above the {r['import_rss_mb']:.0f} MiB of importing jax and lidit_jax.convert; goal <= 1.3x).\n"]
    write_section(lines, "## VAE vs diffusers, and its conversion (`python -m benchmarks.vae`)",
                  "Same random weights in both; medians of --reps calls after compilation / warm-up.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
