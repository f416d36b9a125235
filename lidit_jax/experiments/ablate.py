"""The paper's ablations (Tables 3, 5 and 6, Figure 3) at toy scale, on the embedded shapes data.

  python -m lidit_jax.experiments.ablate --out runs/ablate [--steps 600] [--seeds 0,1,2] [--variants ...]

Every variant trains configs/shapes.py with one change and the same budget (steps, batch, data, seeds),
then generates one image per held-out three-object prompt ("a red circle to the left of a blue square
above a green triangle": three attribute-object phrases, so a phrase's position can matter) and scores
it with the demo's detector. Written to OUT:
  VARIANT/seed_S/        the run (config, metrics, samples) and its eval.json; finished runs are reused, so an
                         interrupted study resumes. Checkpoints are deleted once a run is evaluated (unless
                         --keep_checkpoints), which keeps OUT small enough to commit (e.g. --out docs/ablation).
  results.json           every run's metrics, and per variant the mean and spread over seeds
  ablation.md            the table: accuracies per variant, mean +- standard deviation over seeds
  position.png           object accuracy by phrase position in the prompt, per variant (paper Figure 3)
"""
from __future__ import annotations

import json
import os

import numpy as np

VARIANTS = {  # name -> (config overrides, what it tests)
    "baseline": ({}, "LI-DiT as in the demo: 2-block bidirectional gated refiners, instruction, two towers, collaborative"),
    "refiner_depth_0": ({"model.refiner.depth": 0}, "no linguistic token refiner (Table 3)"),
    "refiner_depth_1": ({"model.refiner.depth": 1}, "one refiner block (Table 3)"),
    "causal_refiner": ({"model.refiner.causal": True}, "refiner keeps the LLM's causal mask (Table 3)"),
    "no_gates": ({"model.refiner.gated": False}, "refiner without its timestep / text gates (Table 3)"),
    "no_instruction": ({"text.instruction": ""}, "no LI-DiT instruction before the prompt (Table 5)"),
    "one_tower": ({"text.use": "llama_a", "model.refiner.fusion": "concat"}, "one LLM tower instead of two (Table 6)"),
    "concat": ({"model.refiner.fusion": "concat"}, "two towers, plain concatenation, no collaborative refiner (Table 6)"),
}
METRICS = ("colour_accuracy", "shape_accuracy", "object_accuracy", "relation_accuracy", "count_accuracy",
           "prompt_accuracy", "object_accuracy_first_phrase", "object_accuracy_last_phrase")


def variant_config(base: str, name: str, seed: int, steps: int):
  from lidit_jax import configs
  c = configs.apply_overrides(configs.load_config_file(base), VARIANTS[name][0])
  c.seed = seed
  c.train.update(num_steps=steps, checkpoint_every=steps, sample_every=steps)
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, steps // 10))
  return configs.validate(c)


def config_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
  """Keys whose value differs between a finished run's config and the study's. Sections and fields the code
  added since (absent from the saved run) do not count: they hold defaults the run did not read."""
  out = []
  for key, value in saved.items():
    name = prefix + key
    if key not in now:
      out.append(name)
    elif isinstance(value, dict) and isinstance(now[key], dict):
      out += config_differences(value, now[key], name + ".")
    elif value != now[key]:
      out.append(name)
  return out


def run_one(config, workdir: str, num_prompts: int, keep_checkpoints: bool = False) -> dict:
  from lidit_jax import evaluate, state, train
  from lidit_jax.pipeline import Pipeline, Workdir
  path = os.path.join(workdir, "eval.json")
  if os.path.exists(path):
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      made_with = json.load(f)
    changed = config_differences(made_with, json.loads(config.to_json_best_effort()))
    if changed:
      from lidit_jax.cli import UserError
      raise UserError(f"{workdir} holds a finished run of another config ({', '.join(changed[:4])} changed since). "
                      "Fix: give a new --out, or delete that directory to re-run it")
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  train.train_and_evaluate(config, workdir)
  pipe = Pipeline(Workdir.of(*state.restore_for_inference(config, workdir)))
  step = pipe.backend.step
  e = config.eval
  result = evaluate.evaluate(pipe, num_prompts, e.steps, e.cfg, batch_size=e.batch_size, out_dir=workdir,
                             min_objects=3, scene_seed=config.seed)
  result["checkpoint_step"] = step
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  if not keep_checkpoints:
    import shutil
    for sub in ("checkpoints", "tb"):
      shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
  return result


def aggregate(runs: dict) -> dict:
  """{variant: {metric: (mean, std, n)}} plus accuracy by phrase index."""
  out = {}
  for name, per_seed in runs.items():
    vals = list(per_seed.values())
    agg = {m: (float(np.mean([v[m] for v in vals])), float(np.std([v[m] for v in vals])), len(vals)) for m in METRICS}
    by_index = np.array([v["object_accuracy_by_phrase_index"] for v in vals], np.float64)
    agg["object_accuracy_by_phrase_index"] = (by_index.mean(0).tolist(), by_index.std(0).tolist(), len(vals))
    out[name] = agg
  return out


def table(agg: dict, steps: int, num_prompts: int) -> str:
  head = ("| variant | what it tests | colour | shape | object | relation | object count | whole prompt | first phrase |"
          " last phrase | seeds |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
  rows = []
  for name, a in agg.items():
    cells = " | ".join(f"{a[m][0]:.3f} ± {a[m][1]:.3f}" for m in METRICS)
    rows.append(f"| {name} | {VARIANTS[name][1]} | {cells} | {a[METRICS[0]][2]} |")
  return (f"Held-out three-object prompts ({num_prompts} per run), {steps} training steps per run; mean ± standard "
          "deviation over seeds.\n\n" + head + "\n".join(rows) + "\n")


def plot(agg: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for k, (name, a) in enumerate(agg.items()):
    mean, std, _ = a["object_accuracy_by_phrase_index"]
    x = np.arange(1, len(mean) + 1) + (k - len(agg) / 2) * 0.02  # small offsets keep error bars apart
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=name)
  ax.set_xticks(range(1, len(mean) + 1))
  ax.set_xlabel("phrase position in the prompt")
  ax.set_ylabel("object accuracy (colour and shape right)")
  ax.set_title("Prompt following by phrase position (paper Fig. 3, toy scale)")
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def ablate(out: str, base: str, variants: list[str], seeds: list[int], steps: int, num_prompts: int,
           keep_checkpoints: bool = False) -> dict:
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown}. Fix: pick from {list(VARIANTS)}.")
  # Seed-major, so an interrupted study already has every variant at its first seed; all refused up front.
  configs_ = {(v, s): variant_config(base, v, s, steps) for s in seeds for v in variants}
  runs = {v: {} for v in variants}
  for (v, s), config in configs_.items():
    print(f"[ablate] {v} seed {s}: {VARIANTS[v][1]}", flush=True)
    runs[v][s] = run_one(config, os.path.join(out, v, f"seed_{s}"), num_prompts, keep_checkpoints)
  agg = aggregate(runs)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"steps": steps, "num_prompts": num_prompts, "seeds": seeds, "base": base,
               "runs": {v: {str(s): r for s, r in rs.items()} for v, rs in runs.items()}, "aggregate": agg}, f, indent=2)
  with open(os.path.join(out, "ablation.md"), "w", encoding="utf-8") as f:
    f.write(table(agg, steps, num_prompts))
  plot(agg, os.path.join(out, "position.png"))
  return agg


def main(argv):
  from absl import flags
  f = flags.FLAGS
  from lidit_jax.cli import UserError
  variants = [v.strip() for v in f.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise UserError(f"--variants: unknown variant(s) {unknown}. Fix: choose from {', '.join(VARIANTS)}")
  try:
    seeds = [int(s) for s in f.seeds.split(",")]
  except ValueError:
    raise UserError(f"--seeds={f.seeds!r}: not a comma-separated list of integers. Fix: e.g. --seeds 0,1") from None
  os.makedirs(f.out, exist_ok=True)
  ablate(f.out, f.config, variants, seeds, f.steps, f.num_prompts, f.keep_checkpoints)
  print(open(os.path.join(f.out, "ablation.md"), encoding="utf-8").read())
  print(f"wrote {f.out}/results.json, ablation.md, position.png")


if __name__ == "__main__":
  from absl import flags
  from lidit_jax import cli
  flags.DEFINE_string("out", "runs/ablate", "Output directory (finished runs in it are reused).")
  flags.DEFINE_string("config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "shapes.py"),
                      "Base config (file[:variant]); each variant changes one thing in it.")
  flags.DEFINE_string("variants", ",".join(VARIANTS), "Comma-separated variants: " + ", ".join(VARIANTS))
  flags.DEFINE_string("seeds", "0,1", "Comma-separated seeds (model init, data and noise).")
  flags.DEFINE_integer("steps", 600, "Training steps per run.")
  flags.DEFINE_integer("num_prompts", 128, "Held-out three-object prompts per run.")
  flags.DEFINE_bool("keep_checkpoints", False, "Keep each run's checkpoints after its evaluation.")
  cli.run(main)
