"""The evaluator's sampler, steps, guidance and sampling shift, swept on one trained checkpoint.

  python -m benchmarks.sampler_sweep --workdir /tmp/demo [--config configs/shapes.py] \
      [--setting NAME=key=value,key=value ...] [--num_prompts 128] [--probe_pairs 16]

Each setting is a set of `sample.*` / `eval.*` overrides (`--setting base=` is the config as it is), evaluated
on the same held-out prompts and noise with the checkpoint's EMA weights. Seconds are the whole evaluation
(compilation included, as in `python -m lidit_jax`). One JSON line per setting; a dated table goes to
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

from benchmarks.learning_curve import METRICS, machine_line, parse_arm, table_lines, write_section


def sweep(config_path: str, workdir: str, settings: list[tuple[str, dict]], num_prompts: int,
          probe_pairs: int) -> list[dict]:
  from lidit_jax import configs, evaluate, state as state_lib
  from lidit_jax.pipeline import Pipeline, Workdir
  for name, overrides in settings:
    bad = [k for k in overrides if not k.startswith(("sample.", "eval."))]
    if bad:
      raise configs.ConfigError(f"--setting {name}: {bad} are not sample.* / eval.* keys. Fix: a sweep changes "
                                "sampling only; train another checkpoint for other keys (benchmarks.learning_curve)")
  config = configs.validate(configs.load_config_file(config_path))
  s, params, step = state_lib.restore_for_inference(config, workdir)
  rows = []
  for name, overrides in settings:
    setting = dataclasses.replace(s, config=configs.validate(configs.apply_overrides(copy.deepcopy(config), overrides)))
    e = setting.config.eval
    t0 = time.perf_counter()
    r = evaluate.evaluate(Pipeline(Workdir.of(setting, params)), num_prompts, e.steps, e.cfg, batch_size=e.batch_size,
                          num_probe_pairs=probe_pairs, scene_seed=setting.config.seed)
    row = {"setting": name, "overrides": overrides, "step": step, "seconds": time.perf_counter() - t0,
           **{k: r[k] for k in METRICS}, "relation_offsets": r["relation_offsets"]}
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def add_table(rows: list[dict], config_path: str, workdir: str, path: str = "benchmarks/RESULTS.md"):
  lines = [machine_line(config_path), f"Checkpoint: `{workdir}` at step {rows[0]['step']}.\n\n",
           *table_lines(rows, "setting", [("eval s", "seconds", ".0f")])]
  write_section(lines, "## Demo sampler sweep (`python -m benchmarks.sampler_sweep`)",
                "Held-out accuracy (our evaluator) and the relation probe for sampling settings on one checkpoint "
                "(same prompts, same noise); seconds are one whole evaluation, compilation included.", path)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/shapes.py")
  ap.add_argument("--workdir", required=True, help="a training workdir with a checkpoint")
  ap.add_argument("--setting", action="append", default=None, help="NAME=key=value,key=value (repeatable)")
  ap.add_argument("--num_prompts", type=int, default=128)
  ap.add_argument("--probe_pairs", type=int, default=16)
  ap.add_argument("--no_table", action="store_true", help="do not write benchmarks/RESULTS.md")
  args = ap.parse_args()
  from lidit_jax import cli
  with cli.user_errors():  # a bad setting, config or workdir: one message, exit status 2
    rows = sweep(args.config, args.workdir, [parse_arm(x) for x in args.setting or ["config="]], args.num_prompts,
                 args.probe_pairs)
  if not args.no_table:
    add_table(rows, args.config, args.workdir)


if __name__ == "__main__":
  main()
