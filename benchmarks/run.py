"""The benchmark suite in one command: every figure is a ratio measured in the same run.

  python -m benchmarks.run --quick --out results.json   # a few minutes
  python -m benchmarks.run --out results.json           # the full suite (adds the data and conversion runs)

- train_step_flop_utilization: model FLOPs / s of our jitted LI-DiT train step (LI-DiT-1B widths: DiT 1152 x 16
  heads, refiners; reduced depth; 256 image tokens as at 256 px; the demo's two small frozen towers) over the
  FLOP / s of a large jitted matmul measured around it. FLOPs from XLA's cost analysis of the compiled step.
- train_step_speedup_vs_torch / sample_step_speedup_vs_torch: our DiT set up as diffusers'
  PixArtTransformer2DModel against that model (benchmarks/vs_torch.py): train step and one network evaluation.
- compile_time_ratio_depth28_vs_2: LI-DiT-1B train step compile seconds at DiT depth 28 over depth 2 (scanned,
  8 simulated devices, fsdp=8; benchmarks/compile_time.py in a subprocess).
- text_encoder_speedup_vs_torch: our decoder LLM vs transformers' LlamaModel, forward tokens / s.
- vs_unet: our SD U-Net against diffusers' UNet2DConditionModel, train step and forward (benchmarks/unet.py).
- Full run only: the data pipeline (benchmarks/data_pipeline.py), HF LLM conversion (benchmarks/convert_llm.py)
  and SD single-file conversion (benchmarks/convert_single_file.py) figures, run in subprocesses.
Writes JSON (--out) and rewrites its section of benchmarks/RESULTS.md (not with --no-record).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOALS = {"train_step_flop_utilization": (">=", 0.5), "train_step_speedup_vs_torch": (">=", 1.3),
         "sample_step_speedup_vs_torch": (">=", 1.3), "compile_time_ratio_depth28_vs_2": ("<=", 1.5)}


def lidit_1b_width_config(depth: int, batch: int):
  """The demo config at LI-DiT-1B's DiT and refiner widths, 256 image tokens (32 x 32 pixels, patch 2, the
  token count of 256 px with the 8x VAE), float32 (this CPU has no fast bf16)."""
  from lidit_jax import configs
  c = configs.load_config_file(os.path.join(ROOT, "configs", "shapes.py"))
  c.model.update(width=1152, num_heads=16, depth=depth, patch_size=2, pos_embed="resblock", dtype="float32")
  c.model.refiner.update(num_heads=16)
  c.train.batch_size = batch
  return configs.validate(c)


def subprocess_json(args: list[str], env: dict | None = None, timeout: int = 3600) -> dict:
  out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
  if out.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
  return json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="smaller models and fewer repetitions (a few minutes)")
  ap.add_argument("--out", default=None, help="write the results as JSON here")
  ap.add_argument("--no-record", action="store_true", help="do not touch RESULTS.md")
  ap.add_argument("--record-from", default=None, help="rewrite RESULTS.md from a saved --out JSON, measuring nothing")
  args = ap.parse_args()
  if args.record_from:
    with open(args.record_from, encoding="utf-8") as f:
      return record(json.load(f))
  import jax
  from benchmarks import demo_step, vs_torch
  q = args.quick
  r = {"date": datetime.date.today().isoformat(), "quick": q, "jax": jax.__version__,
       "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
                  f"{jax.devices()[0].platform}", "command": "python -m benchmarks.run" + (" --quick" if q else "")}

  def log(key):
    print(json.dumps({key: r[key]}), flush=True)

  # 1. Train step against the matmul peak, measured around it.
  peak = demo_step.matmul_peak()
  step = demo_step.train_step_rate(lidit_1b_width_config(depth=2 if q else 4, batch=8), 3 if q else 5)
  peak = max(peak, demo_step.matmul_peak())
  r["train_step"] = {**step, "matmul_peak_gflops": peak}
  r["train_step_flop_utilization"] = step["gflops_achieved"] / peak
  log("train_step")
  # 2. Against PyTorch (diffusers PixArt, transformers Llama).
  r["vs_pixart"] = vs_torch.dit_vs_pixart(depth=2 if q else 4, batch=2 if q else 4, reps=2 if q else 3)
  r["train_step_speedup_vs_torch"] = r["vs_pixart"]["train_speedup"]
  r["sample_step_speedup_vs_torch"] = r["vs_pixart"]["sample_speedup"]
  log("vs_pixart")
  r["vs_llama"] = vs_torch.llm_vs_transformers(layers_=4 if q else 8, batch=4 if q else 8, seq=64 if q else 128)
  r["text_encoder_speedup_vs_torch"] = r["vs_llama"]["speedup"]
  log("vs_llama")
  # 3. Compile time vs depth, on 8 simulated devices (a fresh process: the device count is fixed at start-up).
  # Depth 2 twice, first and last: the first compile of a process also pays one-time start-up costs.
  ct = subprocess_json(["benchmarks.compile_time", "--depths", "2,28,2", "--unrolled", "" if q else "2,8", "--no-record"],
                       env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  r["compile"] = ct["rows"]
  sec = {}
  for row in ct["rows"]:
    key = (row["depth"], row["scan"])
    sec[key] = min(sec.get(key, float("inf")), row["seconds"])
  r["compile_time_ratio_depth28_vs_2"] = sec[(28, True)] / sec[(2, True)]
  log("compile")
  # 4. Full run: the data pipeline and conversion benchmarks of their own issues.
  if not q:
    r["data_pipeline"] = subprocess_json(["benchmarks.data_pipeline", "--no-record"])
    r["convert_llm"] = subprocess_json(["benchmarks.convert_llm", "--no-record"])
    r["convert_single_file"] = subprocess_json(["benchmarks.convert_single_file", "--no-record"])
  # 5. The SD family: our U-Net against diffusers' (SD 1.5 widths; --quick: a tiny one).
  r["vs_unet"] = subprocess_json(["benchmarks.unet", "--no-record"] + (["--quick"] if q else []))
  log("vs_unet")
  summary = {k: r[k] for k in GOALS}
  summary["text_encoder_speedup_vs_torch"] = r["text_encoder_speedup_vs_torch"]
  print(json.dumps(summary))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(r, f, indent=2)
  if not args.no_record:
    record(r)


SECTION = "## Suite: ratios against the machine and against PyTorch (`python -m benchmarks.run`)"


def verdict(key: str, value: float) -> str:
  op, goal = GOALS[key]
  met = value >= goal if op == ">=" else value <= goal
  return f"met (goal {op} {goal})" if met else f"**missed** (goal {op} {goal}; {value / goal:.2f}x of it)"


def record(r: dict) -> None:
  from benchmarks.compile_time import replace_section
  ts, px, ll = r["train_step"], r["vs_pixart"], r["vs_llama"]
  comp = ", ".join(f"depth {c['depth']} {'scanned' if c['scan'] else 'unrolled'} {c['seconds']:.1f} s"
                   for c in r["compile"]) + " (in that order; the ratio uses each depth's fastest)"
  rows = [
      ("train-step FLOP utilization", "train_step_flop_utilization",
       f"{ts['gflops_achieved']:.1f} GFLOP/s of the train step (DiT 1152 x 16 heads, depth {r['quick'] and 2 or 4}, "
       f"batch {ts['batch_size']}, {ts['gflop_per_step']:.0f} GFLOP/step) / {ts['matmul_peak_gflops']:.0f} GFLOP/s matmul"),
      ("train step vs PyTorch (PixArt)", "train_step_speedup_vs_torch",
       f"{px['torch_train_s'] * 1e3:.0f} ms / {px['ours_train_s'] * 1e3:.0f} ms; {px['train_gflop'] / px['ours_train_s']:.0f} vs "
       f"{px['train_gflop'] / px['torch_train_s']:.0f} GFLOP/s against matmul peaks of {px['jax_matmul_gflops']:.0f} (XLA) and "
       f"{px['torch_matmul_gflops']:.0f} (torch) (width {px['width']}, depth {px['depth']}, "
       f"batch {px['batch']}, {px['latent']}x{px['latent']} latents, {px['text_len']} text tokens; params "
       f"{px['ours_params'] / 1e6:.1f} M vs {px['torch_params'] / 1e6:.1f} M)"),
      ("sampling step vs PyTorch (PixArt)", "sample_step_speedup_vs_torch",
       f"{px['torch_forward_s'] * 1e3:.0f} ms / {px['ours_forward_s'] * 1e3:.0f} ms per network evaluation; "
       f"{px['forward_gflop'] / px['ours_forward_s']:.0f} vs {px['forward_gflop'] / px['torch_forward_s']:.0f} GFLOP/s. "
       f"Unrolled blocks (model.scan=False): {px['train_speedup_unrolled']:.2f}x train, "
       f"{px['sample_speedup_unrolled']:.2f}x sampling"),
      ("compile time, depth 28 / depth 2", "compile_time_ratio_depth28_vs_2", comp),
  ]
  body = (f"{r['date']}, {r['machine']}, jax {r['jax']}, torch {px['torch']}. Command: `{r['command']}`. "
          "Speedups above 1 mean we are faster.\n\n| figure | value | goal | measured |\n|---|---|---|---|\n")
  body += "".join(f"| {name} | {r[key]:.2f} | {verdict(key, r[key])} | {detail} |\n" for name, key, detail in rows)
  body += (f"| text encoder vs transformers (Llama, forward) | {r['text_encoder_speedup_vs_torch']:.2f} | - | "
           f"{ll['ours_tokens_per_s']:.0f} vs {ll['torch_tokens_per_s']:.0f} tokens/s (hidden {ll['hidden']}, "
           f"{ll['layers']} layers, batch {ll['batch']} x {ll['seq']}) |\n")
  if "data_pipeline" in r:
    d = r["data_pipeline"]
    best = max(s["images_per_s_per_core"] for s in d["settings"] if s["size"] == 256)
    body += (f"| data pipeline, 256 px | {best:.0f} images/s/core | - | LI-DiT-1B consumes "
             f"{d['consume_lidit_1b_256']:.0f} images/s per v5p chip at 40 % MFU (see its section) |\n")
  if "convert_llm" in r:
    c = r["convert_llm"]
    body += "".join(
        f"| HF LLM conversion ({c['params'] / 1e9:.2f} B, {c['checkpoint_bytes'] / 1e9:.2f} GB), {cache} cache | "
        f"{c[cache]['memory_over_read_x2']:.1f}x read x2 | - | in memory {c[cache]['memory']['seconds']:.1f} s, "
        f"core {c[cache]['core_over_read_x2']:.2f}x read x2, peak memory {c[cache]['memory_peak_over_ckpt']:.2f}x "
        f"the checkpoint (CLI to Orbax {c[cache]['orbax_over_read_x2']:.1f}x, {c[cache]['orbax_peak_over_ckpt']:.2f}x); "
        "see its section |\n" for cache in ("warm", "cold"))
  replace_section(os.path.join(HERE, "RESULTS.md"), SECTION, body)


if __name__ == "__main__":
  main()
