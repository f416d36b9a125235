"""Compile time of the LI-DiT-1B train step against DiT depth, scanned vs unrolled, on a simulated
8-device mesh (fsdp=8), from abstract inputs (nothing is allocated):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.compile_time [--depths 4,8,16,28]

Text features come from a text cache (towers out of the step), so the figure is the DiT's and the
refiners'. Scanned blocks should compile in about the same time at any depth; unrolled ones grow with it.
Prints one JSON line and rewrites its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax

SECTION = "## LI-DiT-1B train step: compile time vs depth (`python -m benchmarks.compile_time`)"


def compile_seconds(depth: int, scan: bool) -> float:
  from lidit_jax import configs, train
  c = configs.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "lidit_1b.py"))
  c.model.update(depth=depth, scan=scan)
  c.mesh.update(data=1, fsdp=jax.device_count(), tensor=1)
  c.train.batch_size = jax.device_count()
  c.text.cache = "abstract"  # features as inputs: the LLM towers are not part of this step
  c = configs.validate(c)
  t = time.perf_counter()
  train.lower_train_step(c).compile()
  return time.perf_counter() - t


def replace_section(path: str, title: str, body: str) -> None:
  text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
  start = text.find(title)
  if start < 0:
    text = text.rstrip("\n") + "\n\n" + title + "\n\n" + body
  else:
    end = text.find("\n## ", start + len(title))
    text = text[:start] + title + "\n\n" + body + (text[end:] if end >= 0 else "")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depths", default="4,8,16,28")
  parser.add_argument("--unrolled", default="4,8", help="depths also compiled unrolled (scan=False)")
  parser.add_argument("--no-record", action="store_true")
  args = parser.parse_args()
  rows = []
  for depth in map(int, args.depths.split(",")):
    rows.append({"depth": depth, "scan": True, "seconds": round(compile_seconds(depth, True), 1)})
    print(json.dumps(rows[-1]), flush=True)
  for depth in map(int, filter(None, args.unrolled.split(","))):
    rows.append({"depth": depth, "scan": False, "seconds": round(compile_seconds(depth, False), 1)})
    print(json.dumps(rows[-1]), flush=True)
  machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} simulated devices"
  result = {"date": datetime.date.today().isoformat(), "machine": machine, "jax": jax.__version__, "rows": rows}
  print(json.dumps(result))
  if args.no_record:
    return
  base = next(r["seconds"] for r in rows if r["scan"])
  body = (f"{result['date']}, {machine}, jax {result['jax']}. LI-DiT-1B (width 1152, 16 heads, 256 px, batch "
          f"{jax.device_count()}), mesh fsdp={jax.device_count()}, features from a text cache; lower + compile "
          "seconds of the whole train step (forward, backward, AdamW, EMA).\n\n"
          "| DiT depth | blocks | compile s | vs scanned depth " + str(rows[0]["depth"]) + " |\n|---|---|---|---|\n")
  body += "".join(f"| {r['depth']} | {'scanned' if r['scan'] else 'unrolled'} | {r['seconds']:.1f} | "
                  f"{r['seconds'] / base:.2f}x |\n" for r in rows)
  replace_section(os.path.join(os.path.dirname(__file__), "RESULTS.md"), SECTION, body)


if __name__ == "__main__":
  main()
