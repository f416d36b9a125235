"""The shapes demo's train step against this machine's matmul peak, measured side by side in one run.

  python -m benchmarks.demo_step [--steps 20] [--config configs/shapes.py] [--set KEY=VALUE ...]

Prints one JSON line (model GFLOP per step from `plan.step_flops`, step time, achieved GFLOP/s, the peak
GFLOP/s of a large jitted matmul measured in the same process, and their ratio) and adds a dated
row to its table in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(reps):
      r = f(a)
    r.block_until_ready()
    best = min(best, (time.perf_counter() - t) / reps)
  return 2 * n ** 3 / best / 1e9


def train_step_rate(config_path, steps: int, overrides: dict | None = None) -> dict:
  """Median seconds of the jitted train step of `config_path` (a file, or a ConfigDict) with `overrides` and its
  FLOPs from model FLOPs. Batches come from `Setup.text_for` as in training (a text cache included)."""
  from lidit_jax import configs, plan, state as state_lib, train
  from lidit_jax.data import pipeline
  config = configs.load_config_file(config_path) if isinstance(config_path, str) else config_path
  config = configs.validate(configs.apply_overrides(config, overrides or {}))
  s = state_lib.setup(config)
  state = s.init_state(jax.random.key(0))
  step = train.make_train_step(s)
  data = pipeline.ShapesBatches(config, s.text_for)
  batches = [train.device_batch(next(data), s.mesh) for _ in range(steps + 2)]
  rng = jax.random.key(1)
  # Model FLOPs (plan.step_flops: matmuls and attention, backward = 2x forward, the towers' forward). XLA's
  # cost analysis is no substitute here: it counts the body of a scanned (while) loop once, not per layer.
  flops = plan.step_flops(config, {t.name: (None, t.module.cfg) for t in s.towers})
  gflop = (flops["train"] + flops["towers"]) / 1e9
  for b in batches[:2]:  # compile and warm up
    state, m = step(state, s.frozen, b, rng)
  jax.block_until_ready(m)
  times = []
  for b in batches[2:]:
    t = time.perf_counter()
    state, m = step(state, s.frozen, b, rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  sec = float(np.median(times))
  name = config_path if isinstance(config_path, str) else "given"
  name += "".join(f" {k}={v}" for k, v in (overrides or {}).items())
  return {"config": name, "batch_size": config.train.batch_size,
          "gflop_per_step": gflop, "sec_per_step": sec, "steps_per_sec": 1.0 / sec, "gflops_achieved": gflop / sec}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/shapes.py")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  args = ap.parse_args()
  if args.steps < 2:
    ap.error(f"--steps {args.steps}: time at least 2 steps (the first compiles)")
  from lidit_jax import cli, configs
  with cli.user_errors():
    overrides = configs.parse_overrides(args.set)
    configs.validate(configs.apply_overrides(configs.load_config_file(args.config), overrides))
    peak_before = matmul_peak()
    result = train_step_rate(args.config, args.steps, overrides)
  peak = max(peak_before, matmul_peak())  # measured around the step, same process
  result.update(matmul_peak_gflops=peak, flop_utilization=result["gflops_achieved"] / peak,
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
                date=datetime.date.today().isoformat(), jax=jax.__version__)
  print(json.dumps(result))
  add_row(result, peak)


SECTION = "## Demo train step vs matmul peak (`python -m benchmarks.demo_step`)"
TABLE = ("| date | machine | jax | config | batch | GFLOP/step | steps/s | GFLOP/s | matmul peak GFLOP/s | utilization |\n"
         "|---|---|---|---|---|---|---|---|---|---|\n")


def add_row(result: dict, peak: float, path: str | None = None) -> str:
  """Inserts the row after the last row of this benchmark's table in RESULTS.md, wherever its section is
  (other benchmarks' sections may follow it); a missing file or section is created."""
  path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
  row = (f"| {result['date']} | {result['machine']} | {result['jax']} | {result['config']} | {result['batch_size']} | "
         f"{result['gflop_per_step']:.1f} | {result['steps_per_sec']:.2f} | {result['gflops_achieved']:.1f} | "
         f"{peak:.0f} | {result['flop_utilization']:.2f} |\n")
  lines = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines(keepends=True)
  if not lines:
    lines = ["# Benchmark results\n", "\n", "Each row is one run of the command named; ratios are measured within "
             "that run.\n"]
  try:
    start = next(i for i, l in enumerate(lines) if l.rstrip("\n") == SECTION)
  except StopIteration:  # a new section at the end
    text = "".join(lines).rstrip("\n") + "\n\n" + SECTION + "\n\n" + TABLE + row
  else:
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    table_rows = [i for i in range(start, end) if lines[i].startswith("|")]
    if table_rows:
      lines.insert(table_rows[-1] + 1, row)
    else:
      lines[start + 1:start + 1] = ["\n", TABLE, row]
    text = "".join(lines)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


if __name__ == "__main__":
  main()
