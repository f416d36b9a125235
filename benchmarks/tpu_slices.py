"""Every shipped config's train step compiled for Cloud TPU slices on this machine (libtpu, no TPU), beside the
planner's estimate: `python -m lidit_jax.plan --config C --topology T` for each pair, in a subprocess each.

  python -m benchmarks.tpu_slices [--configs lidit_1b,sd15] [--topologies v5p-128] [--timeout 1800]
  python -m benchmarks.tpu_slices --fit     # for each pair that does not fit: `plan --fit`, its overrides compiled
  python -m benchmarks.tpu_slices --calibration   # the off-default points the planner was calibrated / checked on
  python -m benchmarks.tpu_slices --table   # no compiles: the table from the stored results, today's planner

Results accumulate in benchmarks/tpu_slices.json (one entry per config and slice, written after each compile,
kept across runs: a pair already compiled is not compiled again unless --redo; failed ones are). --table prints the markdown table
and rewrites its section of benchmarks/RESULTS.md; the planner's column is recomputed (seconds), so a planner fix
shows against the same compiled figures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("lidit_1b", "lidit_10b", "sd15", "sdxl", "llm4gen_sd15", "diff_adapter", "pixart_sigma", "sana", "lumina2")
TOPOLOGIES = ("v5e-256", "v5p-128", "v5p-512", "v6e-256")
RESULTS = os.path.join(ROOT, "benchmarks", "tpu_slices.json")
# Off-default points the planner's LI-DiT activation model was calibrated on (32 examples per chip, the text
# features as inputs so that the DiT and the refiners are all there is, each remat policy), and checked on:
# --calibration compiles them; the table lists them under their flags.
CALIBRATION = [("lidit_1b", "v5p-8", ["--config.train.batch_size=128", "--config.text.cache=abstract",
                                      f"--config.model.remat={remat}"]) for remat in ("dots_no_batch", "full", "none")]
CALIBRATION += [("lidit_10b", "v5p-512", ["--config.train.grad_accum=4"])]
# The step's memory and traffic improved where the compiled numbers pointed (benchmarks/RESULTS.md, before / after):
# the frozen towers' all-gathers gone with cached features, and the kernels fsdp=256 cannot split sharded over 128.
CALIBRATION += [("lidit_1b", "v6e-256", ["--config.text.cache=abstract"]),
                ("lidit_1b", "v6e-256", ["--config.mesh.data=2", "--config.mesh.fsdp=128"]),
                ("pixart_sigma", "v5p-128", ["--config.model.attention=splash"])]  # splash where its blocks tile
# The open DiTs' own figures (denoisers/lumina2.py, sana.py, pixart.py): 2 against 6 layers at 1024 px, 4 examples a
# chip, the text features as inputs; Lumina 2 under each remat policy and with XLA's attention (its scores' bytes).
OPEN = ["--config.train.batch_size=16", "--config.text.cache=abstract"]
LUMINA = ["--config.lumina2.num_refiner_layers=1"]
CALIBRATION += [("lumina2", "v5p-8", OPEN + [f"--config.lumina2.num_layers={n}", *LUMINA, f"--config.model.remat={r}"])
                for n in (2, 6) for r in ("none", "dots_no_batch", "full")]
CALIBRATION += [("lumina2", "v5p-8", OPEN + ["--config.lumina2.num_layers=2", *LUMINA, "--config.model.remat=none",
                                              "--config.model.attention=xla"])]
CALIBRATION += [(config, "v5p-8", OPEN + [f"--config.{section}.num_layers={n}", "--config.model.remat=none"])
                for config, section in (("pixart_sigma", "pixart"), ("sana", "sana")) for n in (2, 6)]
SECTION = "## Shipped configs compiled for TPU slices, planner vs compiler (`python -m benchmarks.tpu_slices`)"
GiB = 2 ** 30


def load() -> dict:
  return json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}


def save(results: dict) -> None:
  tmp = RESULTS + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(tmp, RESULTS)


def compile_one(config: str, topology: str, timeout: float, extra: list[str], fit: bool = False) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the compiler's own time
  start = time.perf_counter()
  try:
    r = subprocess.run([sys.executable, "-m", "lidit_jax.plan", "--config", f"configs/{config}.py", "--topology",
                        topology, *extra, *(["--fit"] if fit else [])], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"no result within {timeout:.0f} s", "wall_seconds": round(time.perf_counter() - start)}
  if r.returncode != 0:
    why = (f"killed by signal {-r.returncode} (on this machine: out of host memory, the compile's own)"
           if r.returncode < 0 else (r.stderr.strip().splitlines() or ["?"])[-1][:500])
    return {"error": why,
            "wall_seconds": round(time.perf_counter() - start)}
  out = json.loads(r.stdout.strip().splitlines()[-1])
  return {"compiled": out["compiled"], "flags": extra + (out["fit"]["flags"] if fit else []), "wall_seconds": round(time.perf_counter() - start),
          "date": datetime.date.today().isoformat(), "jax": out["compiled"].get("jax"), "host": platform.node()}


def planner_bytes(config: str, topology: str, extra: list[str]) -> float:
  """Today's planner estimate per chip for the pair (no compile)."""
  from lidit_jax import configs, plan, tpu_compile
  c = configs.load_config_file(os.path.join(ROOT, "configs", f"{config}.py"))
  typed = lambda v: int(v) if v.lstrip("-").isdigit() else v  # as the command line parses them
  overrides = {k: typed(v) for k, v in (f.removeprefix("--config.").split("=", 1) for f in extra)}
  c = configs.validate(configs.apply_overrides(c, overrides), data=False)
  t = tpu_compile.parse(topology)
  c = tpu_compile.configure(c, t)
  return plan.plan(tpu_compile.planner_view(c, t), t.chips, t.chip, count_flops=False)["bytes_per_device"]["total"]


def squeezed(c: dict, planned: float) -> str:
  """A mark where the compiler may have rematerialised on its own to fit (lidit_jax/tpu_compile.SQUEEZED)."""
  from lidit_jax import tpu_compile
  near = c["peak_bytes"] > tpu_compile.SQUEEZED * c["hbm_bytes"] and planned > tpu_compile.SQUEEZED * c["hbm_bytes"]
  return " (squeezed)" if near else ""


def table(results: dict) -> str:
  rows = ["| config | slice | fits | compiled GiB / chip (HBM) | planner GiB | planner / compiled | compile s | "
          "`--fit` overrides: compiled GiB, planner / compiled |", "|---|---|---|---|---|---|---|---|"]
  others = sorted({k.split("|")[1] for k in results if k.count("|") == 1} - set(TOPOLOGIES))  # e.g. a smaller slice
  for config in CONFIGS:
    for topology in TOPOLOGIES + tuple(others):
      r = results.get(f"{config}|{topology}")
      if r is None:
        continue
      if "error" in r:
        rows.append(f"| {config} | {topology} | error: {r['error'].removeprefix('error: ')[:90]} | | | | "
                    f"{r['wall_seconds']} | |")
        continue
      c = r["compiled"]
      planned = planner_bytes(config, topology, r.get("flags", []))
      peak = c["peak_bytes"]
      fits = "yes" if c["fits"] else "**no**"
      compiled = f"{peak / GiB:.2f} ({c['hbm_bytes'] / GiB:.0f})" + (" refused" if "compiler_message" in c else "")
      # a refused program's bytes are the compiler's after its own rematerialisation: no like-for-like ratio
      ratio = "-" if "compiler_message" in c else f"{planned / peak:.2f}" + squeezed(c, planned)
      fitted = results.get(f"{config}|{topology}|fit")
      if fitted and "compiled" in fitted:
        fc = fitted["compiled"]
        ff = [f for f in fitted["flags"] if f not in r.get("flags", [])]
        fit_cell = (f"`{' '.join(f.removeprefix('--config.') for f in ff)}`: {fc['peak_bytes'] / GiB:.2f}, "
                    f"{planner_bytes(config, topology, fitted['flags']) / fc['peak_bytes']:.2f}")
      else:
        fit_cell = fitted["error"][:80] if fitted else ""
      rows.append(f"| {config} | {topology} | {fits} | {compiled} | {planned / GiB:.2f} | {ratio} | "
                  f"{c['compile_seconds']:.0f} | {fit_cell} |")
  for config, topology, flags in CALIBRATION:
    r = results.get(f"{config}|{topology}|{' '.join(flags)}")
    if r is None or "compiled" not in r:
      continue
    c, planned = r["compiled"], planner_bytes(config, topology, flags)
    rows.append(f"| {config} `{' '.join(f.removeprefix('--config.') for f in flags)}` | {topology} | "
                f"{'yes' if c['fits'] else '**no**'} | {c['peak_bytes'] / GiB:.2f} ({c['hbm_bytes'] / GiB:.0f}) | "
                f"{planned / GiB:.2f} | {planned / c['peak_bytes']:.2f}{squeezed(c, planned)} | "
                f"{c['compile_seconds']:.0f} | |")
  return "\n".join(rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", default=",".join(CONFIGS))
  ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
  ap.add_argument("--timeout", type=float, default=1800)
  ap.add_argument("--redo", action="store_true", help="compile pairs already in the results again")
  ap.add_argument("--fit", action="store_true", help="for each stored pair that does not fit: plan --fit")
  ap.add_argument("--calibration", action="store_true", help="compile the CALIBRATION points")
  ap.add_argument("--table", action="store_true", help="no compiles: print the table, rewrite RESULTS.md")
  ap.add_argument("extra", nargs="*", help="--config.X=Y overrides passed to every compile (after --)")
  a = ap.parse_args()
  results = load()
  if a.calibration:
    for config, topology, flags in CALIBRATION:
      key = f"{config}|{topology}|{' '.join(flags)}"
      if key in results and "error" not in results[key] and not a.redo:
        continue
      print(f"{key}: compiling ...", flush=True)
      result = compile_one(config, topology, a.timeout, flags)
      results = {**load(), key: result}
      save(results)
  elif not a.table:
    for config in a.configs.split(","):
      for topology in a.topologies.split(","):
        key = f"{config}|{topology}" + (f"|{' '.join(a.extra)}" if a.extra else "")  # flags: a point of its own
        if a.fit:
          base = results.get(key, {})
          if "compiled" not in base or base["compiled"]["fits"]:
            continue
          key += "|fit"
        if key in results and "error" not in results[key] and not a.redo:
          continue
        print(f"{key}: compiling ...", flush=True)
        result = compile_one(config, topology, a.timeout, a.extra, a.fit)
        results = {**load(), key: result}  # read again after the compile: another run may have saved meanwhile
        save(results)
        r = results[key]
        print(f"{key}: {r.get('error') or {k: r['compiled'].get(k) for k in ('fits', 'peak_bytes')}} "
              f"({r['wall_seconds']} s)", flush=True)
  text = table(results)
  print(text)
  if a.table:
    from benchmarks.compile_time import replace_section
    body = (f"Compiled on {platform.node()} (2 CPU cores, no TPU; libtpu's compiler), "
            f"{datetime.date.today().isoformat()}; per chip: the compiled program's arguments + temporaries + "
            "unaliased outputs + code against the chip's HBM; the planner's estimate from abstract shapes.\n\n"
            + text)
    replace_section(os.path.join(ROOT, "benchmarks", "RESULTS.md"), SECTION, body)


if __name__ == "__main__":
  main()
