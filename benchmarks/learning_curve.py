"""Held-out prompt following against training wall-clock seconds, for one or more arms run one after another.

  python -m benchmarks.learning_curve [--config configs/shapes.py] [--eval_at 500,1000,1500] \
      [--arm NAME=key=value,key=value ...] [--num_prompts 64] [--probe_pairs 16]

Each arm is the config with its overrides (`--arm base=` is the config as it is). An arm trains from scratch in
this process (the same pieces as `lidit_jax.train`: data, jitted step, EMA), and at each --eval_at step the EMA
weights are evaluated on held-out prompts (the evaluator, the config's sampler, steps and guidance) with the
relation probe. Seconds are training only (data + steps; compilation and evaluation excluded). One JSON line
per evaluation is printed and appended to --out; a dated table goes to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax

METRICS = ("colour_accuracy", "shape_accuracy", "relation_accuracy", "count_accuracy", "prompt_accuracy",
           "relation_sensitivity")


def parse_arm(spec: str) -> tuple[str, dict]:
  from lidit_jax import configs
  name, _, rest = spec.partition("=")
  return name, configs.parse_overrides(filter(None, (x.strip() for x in rest.split(","))))


def run_arm(config_path: str, name: str, overrides: dict, eval_at: list[int], num_prompts: int, probe_pairs: int,
            out: str | None, grids: str | None = None) -> list[dict]:
  from tqdm import tqdm
  from lidit_jax import configs, evaluate, train, state as state_lib
  from lidit_jax.data import pipeline
  from lidit_jax.pipeline import Pipeline, Workdir
  config = configs.load_config_file(config_path)
  config = configs.validate(configs.apply_overrides(config, {"train.num_steps": max(eval_at), **overrides}))
  s = state_lib.setup(config)
  state = s.init_state(jax.random.key(config.seed))
  step_fn = train.make_train_step(s)
  data = pipeline.make_batches(config, s.text_for)
  rng = jax.random.key(config.seed + 2)
  e = config.eval
  rows, seconds, t0 = [], 0.0, None
  for step in tqdm(range(max(eval_at)), desc=name, dynamic_ncols=True, mininterval=10):
    if step == 1:  # the first step compiles: its time is not training time
      jax.block_until_ready(state)
      t0 = time.perf_counter()
    state, _ = step_fn(state, s.frozen, train.device_batch(next(data), s.mesh), rng)
    if step + 1 in eval_at:
      jax.block_until_ready(state)
      seconds += time.perf_counter() - t0
      r = evaluate.evaluate(Pipeline(Workdir.of(s, state.ema_params)), num_prompts, e.steps, e.cfg,
                            batch_size=e.batch_size, num_probe_pairs=probe_pairs, scene_seed=config.seed,
                            out_dir=grids and os.path.join(grids, name, str(step + 1)))
      # Step 1 (compilation) is not timed: scale to the whole run at the measured rate.
      row = {"arm": name, "overrides": overrides, "step": step + 1,
             "train_seconds": seconds * (step + 1) / step, **{k: r[k] for k in METRICS},
             "relation_offsets": r["relation_offsets"]}
      rows.append(row)
      tqdm.write(json.dumps(row))
      if out:
        with open(out, "a", encoding="utf-8") as f:
          f.write(json.dumps(row) + "\n")
      t0 = time.perf_counter()
  data.close()
  return rows


def machine_line(config_path: str) -> str:
  machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}"
  return f"\n### {datetime.date.today().isoformat()}, {machine}, jax {jax.__version__}, {config_path}\n\n"


def write_section(lines: list[str], marker: str, intro: str, path: str = "benchmarks/RESULTS.md"):
  """Append `lines` to the RESULTS.md section headed `marker` (made, with `intro`, if missing)."""
  text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
  if marker not in text:
    text += f"\n{marker}\n\n{intro}\n"
  head, _, tail = text.partition(marker)
  nxt = tail.find("\n## ")
  section, rest = (tail, "") if nxt < 0 else (tail[:nxt], tail[nxt:])
  open(path, "w", encoding="utf-8").write(head + marker + section.rstrip("\n") + "\n" + "".join(lines) + rest)


def table_lines(rows: list[dict], name: str, extra: list[tuple[str, str, str]]) -> list[str]:
  """Markdown table: rows[name] | the overrides | each (header, key, format) of `extra` | the metrics."""
  heads = [name, "overrides", *(h for h, _, _ in extra), "colour", "shape", "relation", "count", "prompt",
           "relation sensitivity px"]
  lines = ["| " + " | ".join(heads) + " |\n", "|" + "---|" * len(heads) + "\n"]
  for r in rows:
    ov = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(config)"
    cells = [r[name], ov, *(format(r[k], f) for _, k, f in extra), *(f"{r[k]:.2f}" for k in METRICS[:-1]),
             f"{r['relation_sensitivity']:+.1f}"]
    lines.append("| " + " | ".join(map(str, cells)) + " |\n")
  return lines


def add_table(rows: list[dict], config_path: str, path: str = "benchmarks/RESULTS.md"):
  extra = [("step", "step", "d"), ("train s", "train_seconds", ".0f")]
  lines = [machine_line(config_path), *table_lines(rows, "arm", extra)]
  write_section(lines, "## Demo learning curve (`python -m benchmarks.learning_curve`)",
                "Held-out accuracy (our evaluator) and the relation probe against training seconds (data + steps, "
                "compilation and evaluation excluded); the arms of one invocation run one after another in one process.",
                path)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/shapes.py")
  ap.add_argument("--arm", action="append", default=None, help="NAME=key=value,key=value (repeatable)")
  ap.add_argument("--eval_at", default="500,1000,1500", help="comma-separated steps")
  ap.add_argument("--num_prompts", type=int, default=64)
  ap.add_argument("--probe_pairs", type=int, default=16)
  ap.add_argument("--out", default="", help="also append the JSON lines to this file")
  ap.add_argument("--grids", default="", help="save each evaluation's sample grid under DIR/ARM/STEP/")
  ap.add_argument("--no_table", action="store_true", help="do not write benchmarks/RESULTS.md")
  args = ap.parse_args()
  try:
    eval_at = sorted({int(x) for x in args.eval_at.split(",") if x.strip()})
  except ValueError:
    ap.error(f"--eval_at {args.eval_at!r}: not comma-separated steps. Fix: e.g. --eval_at 500,1000")
  if not eval_at or eval_at[0] <= 1:
    ap.error(f"--eval_at {args.eval_at!r}: give steps above 1 (step 1 compiles and is not timed)")
  from lidit_jax import cli, configs
  with cli.user_errors():
    arms = [parse_arm(spec) for spec in args.arm or ["config="]]
    for _, overrides in arms:  # every arm's config is refused before the first one trains
      configs.validate(configs.apply_overrides(configs.load_config_file(args.config), overrides))
    rows = []
    for name, overrides in arms:
      rows += run_arm(args.config, name, overrides, eval_at, args.num_prompts, args.probe_pairs, args.out or None,
                      args.grids or None)
  if not args.no_table:
    add_table(rows, args.config)


if __name__ == "__main__":
  main()
