"""The papers' claims at toy scale, on the embedded shapes data (issue 17): LI-DiT's ablations (Tables 3, 5, 6),
its positional-bias measure (Figure 3), and every conditioner side by side on the DiT and on the U-Net.

  python -m lidit_jax.experiments.pretrain_towers --out checkpoints/pretrained    # the towers, once (torch)
  python -m lidit_jax.experiments.ablate --out docs/study [--groups lidit,conditioners,position] [--seeds 0,1]

Every variant trains configs/shapes.py with its changes and the same budget (steps, batch, data, seeds), then
scores one image per evaluation prompt with the demo's detector. Groups:
  lidit         LI-DiT with the pretrained towers (an instruction-tuned LM + a second LM) and its ablations
  conditioners  plain T5-style tokens, plain causal-LM tokens, LLM4GEN's CAM (the T5 in CLIP's place + the LM),
                the LLM Diff Adapter on the LM, LI-DiT; on the DiT (dit_*, `lidit`) and on the U-Net (unet_*: on
                4 x 4 pixel patches, configs/shapes.py:unet,patches, as fast per step as the DiT here)
  position      trained on scenes of 1 to 6 objects (4 to 6: inventories); prompts of 2 to 6 attribute-object
                phrases, each phrase scored by its relative position in the prompt, per encoder (the base causal
                LM or the T5), with or without LI-DiT's refiner (Figure 3)
  random        the same ablations on the demo's random towers (docs/ablation: the study before issue 17)
The lidit and conditioners groups score 128 held-out three-object prompts ("a red circle to the left of a blue
square above a green triangle": compositions never trained on). Written to OUT:
  VARIANT/seed_S/        the run (config, metrics, samples) and its eval.json; finished runs are reused, so an
                         interrupted study resumes. Checkpoints are deleted once a run is evaluated (unless
                         --keep_checkpoints), which keeps OUT small enough to commit.
  results.json           every run's metrics, and per variant the mean and spread over seeds
  ablation.md            one table per group: accuracies per variant, mean +- standard deviation over seeds
  position.png           object accuracy by the phrase's relative position in the prompt, one panel per group
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import NamedTuple

import numpy as np
from absl import flags

from lidit_jax import configs, evaluate, state, train
from lidit_jax.cli import UserError
from lidit_jax.data.shapes_eval import POSITION_BINS
from lidit_jax.pipeline import Pipeline, Workdir


class Variant(NamedTuple):
  groups: tuple[str, ...]
  config: str  # configs/shapes.py variants it adds to the base config's ("pretrained,unet,patches")
  overrides: dict
  what: str
  prompts: str = "heldout"  # "heldout": held-out 3-object compositions; "long": 2 to 6 phrases (position group)


_LM = {"text.use": "llama_a"}  # the instruction-tuned LM, alone
_T5 = {"text.use": "t5"}
_CAM = {"text.use": "t5,llama_a", "conditioner.cam.clip": "t5", "conditioner.cam.llm": "llama_a"}
_DIFF = {"text.use": "llama_a", "text.towers.llama_a.output": "scores", "conditioner.diff.llm": "llama_a"}
_LONG = {"data.max_objects": 6, "text.towers.lm.max_length": 40, "text.towers.t5.max_length": 40}


def _random_and_pretrained():
  """LI-DiT's ablations, on the random towers (group random: the old names) and on the pretrained ones."""
  changes = {
      "refiner_depth_0": ({"model.refiner.depth": 0}, "no linguistic token refiner (Table 3)"),
      "refiner_depth_1": ({"model.refiner.depth": 1}, "one refiner block (Table 3)"),
      "causal_refiner": ({"model.refiner.causal": True}, "refiner keeps the LLM's causal mask (Table 3)"),
      "no_gates": ({"model.refiner.gated": False}, "refiner without its timestep / text gates (Table 3)"),
      "no_instruction": ({"text.instruction": ""}, "no LI-DiT instruction before the prompt (Table 5)"),
      "one_tower": ({"text.use": "llama_a", "model.refiner.fusion": "concat"}, "one LLM tower instead of two (Table 6)"),
      "concat": ({"model.refiner.fusion": "concat"}, "two towers, plain concatenation, no collaborative refiner (Table 6)"),
  }
  out = {"baseline": Variant(("random",), "", {}, "LI-DiT as in the demo: 2-block bidirectional gated refiners, "
                             "instruction, two towers, collaborative")}
  out.update({k: Variant(("random",), "", o, w) for k, (o, w) in changes.items()})
  out["lidit"] = Variant(("lidit", "conditioners"), "pretrained", {},
                         "LI-DiT on the DiT: pretrained instruction-tuned LM + second LM, 2-block refiners, collaborative")
  out.update({f"lidit_{k}": Variant(("lidit",), "pretrained", o, w) for k, (o, w) in changes.items()})
  out["lidit_no_instruction"] = Variant(("lidit",), "pretrained", {"text.instruction": ""},
                                        "no instruction: the tuned LM reads the prompt as its only chat turn (Table 5)")
  out["lidit_feature_norm"] = Variant(("lidit",), "pretrained", {"model.refiner.feature_norm": True},
                                      "LLM features RMS-normalised before the refiners (not in the paper)")
  return out


VARIANTS = {
    **_random_and_pretrained(),
    "dit_t5_tokens": Variant(("conditioners",), "pretrained", {**_T5, "conditioner.kind": "tokens"},
                             "DiT on plain T5-style encoder tokens"),
    "dit_lm_tokens": Variant(("conditioners",), "pretrained", {**_LM, "conditioner.kind": "tokens"},
                             "DiT on plain causal-LM tokens (the instruction-tuned LM, layer -3)"),
    "dit_cam": Variant(("conditioners",), "pretrained,cam", _CAM,
                       "DiT on LLM4GEN's CAM: T5 tokens (CLIP's place) + the LM through the cross-adapter"),
    "dit_diff_adapter": Variant(("conditioners",), "pretrained,diff", _DIFF,
                                "DiT on the LLM Diff Adapter's phi(code) over the LM's per-block scores"),
    "unet_t5_tokens": Variant(("conditioners",), "pretrained,unet,patches", {**_T5, "conditioner.kind": "tokens"},
                              "U-Net on plain T5-style encoder tokens"),
    "unet_lm_tokens": Variant(("conditioners",), "pretrained,unet,patches", {**_LM, "conditioner.kind": "tokens"},
                              "U-Net on plain causal-LM tokens"),
    "unet_cam": Variant(("conditioners",), "pretrained,unet,patches,cam", _CAM, "U-Net on LLM4GEN's CAM (T5 + LM)"),
    "unet_diff_adapter": Variant(("conditioners",), "pretrained,unet,patches,diff", _DIFF,
                                 "U-Net on the LLM Diff Adapter (phi(code) + second cross-attentions on the code)"),
    "unet_lidit": Variant(("conditioners",), "pretrained,unet,patches", {"conditioner.kind": "refiners"},
                          "U-Net on LI-DiT's refiners over the two LMs"),
    "pos_lm": Variant(("position",), "pretrained", {**_LONG, "text.use": "lm", "model.refiner.depth": 0,
                                                   "model.refiner.fusion": "concat"},
                      "base causal LM, its tokens as they are (no refiner)", "long"),
    "pos_lm_refiner": Variant(("position",), "pretrained", {**_LONG, "text.use": "lm", "model.refiner.fusion": "concat"},
                              "base causal LM + LI-DiT's 2-block bidirectional refiner", "long"),
    "pos_t5": Variant(("position",), "pretrained", {**_LONG, "text.use": "t5", "model.refiner.depth": 0,
                                                   "model.refiner.fusion": "concat"},
                      "T5-style encoder, its tokens as they are (no refiner)", "long"),
    "pos_t5_refiner": Variant(("position",), "pretrained", {**_LONG, "text.use": "t5", "model.refiner.fusion": "concat"},
                              "T5-style encoder + LI-DiT's 2-block bidirectional refiner", "long"),
}
GROUPS = ("lidit", "conditioners", "position", "random")
METRICS = ("colour_accuracy", "shape_accuracy", "object_accuracy", "relation_accuracy", "count_accuracy",
           "prompt_accuracy", "object_accuracy_first_phrase", "object_accuracy_last_phrase")
LONG_METRICS = ("colour_accuracy", "shape_accuracy", "object_accuracy", "count_accuracy", "prompt_accuracy")
HEADS = {"colour_accuracy": "colour", "shape_accuracy": "shape", "object_accuracy": "object",
         "relation_accuracy": "relation", "count_accuracy": "object count", "prompt_accuracy": "whole prompt",
         "object_accuracy_first_phrase": "first phrase", "object_accuracy_last_phrase": "last phrase"}
MAX_OBJECTS_LONG = 6


def variants_of(groups: list[str]) -> list[str]:
  return [name for name, v in VARIANTS.items() if set(v.groups) & set(groups)]


def variant_config(base: str, name: str, seed: int, steps: int):
  """`base` is a config file with optional variants ("configs/shapes.py:tiny"); the variant's own are added."""
  v = VARIANTS[name]
  path, _, base_variants = base.partition(":")
  joined = ",".join(x for x in (base_variants, v.config) if x)
  c = configs.apply_overrides(configs.load_config_file(f"{path}:{joined}" if joined else path), v.overrides)
  c.seed = seed
  c.train.update(num_steps=steps, checkpoint_every=steps, sample_every=steps)
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, steps // 10))
  return configs.validate(c)


def config_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
  """Keys whose value differs between a finished run's config and the study's. Sections and fields the code
  added since (absent from the saved run) do not count: they hold defaults the run did not read; nor do the
  sharding rules (where arrays live across devices, not what a run computes)."""
  out = []
  for key, value in saved.items():
    name = prefix + key
    if name == "sharding_rules":
      continue
    if key not in now:
      out.append(name)
    elif isinstance(value, dict) and isinstance(now[key], dict):
      out += config_differences(value, now[key], name + ".")
    elif value != now[key]:
      out.append(name)
  return out


def run_one(config, workdir: str, num_prompts: int, prompts: str = "heldout", keep_checkpoints: bool = False) -> dict:
  path = os.path.join(workdir, "eval.json")
  if os.path.exists(path):
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      made_with = json.load(f)
    changed = config_differences(made_with, json.loads(config.to_json_best_effort()))
    if changed:
      raise UserError(f"{workdir} holds a finished run of another config ({', '.join(changed[:4])} changed since). "
                      "Fix: give a new --out, or delete that directory to re-run it")
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  pipe = Pipeline(Workdir.of(*state.restore_for_inference(config, workdir)))
  step = pipe.backend.step
  e = config.eval
  which = (dict(split="heldout", min_objects=3) if prompts == "heldout" else
           dict(split="train", min_objects=2, max_objects=MAX_OBJECTS_LONG))
  result = evaluate.evaluate(pipe, num_prompts, e.steps, e.cfg, batch_size=e.batch_size, out_dir=workdir,
                             scene_seed=config.seed, **which)
  result.update(checkpoint_step=step, seconds=time.perf_counter() - start, cpu_cores=os.cpu_count())
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  if not keep_checkpoints:
    for sub in ("checkpoints", "tb"):
      shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
  return result


def _quarters_of_three(result: dict) -> list[float]:
  """Relative-position accuracies of an evaluation that predates them: three-phrase prompts only, at 0, 1/2, 1."""
  first, middle, last = result["object_accuracy_by_phrase_index"]
  return [first, float("nan"), middle, last]


def aggregate(runs: dict) -> dict:
  """{variant: {metric: (mean, std, n)}} plus accuracy by phrase index and by relative position (lists) and the
  positional decay (first minus last quarter)."""
  out = {}
  for name, per_seed in runs.items():
    vals = list(per_seed.values())
    agg = {m: (float(np.mean([v[m] for v in vals])), float(np.std([v[m] for v in vals])), len(vals)) for m in METRICS}
    arrays = {key: np.array([v[key] if key in v else _quarters_of_three(v) for v in vals], np.float64)
              for key in ("object_accuracy_by_phrase_index", "object_accuracy_by_relative_position")}
    for key, arr in arrays.items():
      agg[key] = (arr.mean(0).tolist(), arr.std(0).tolist(), len(vals))
    quarters = arrays["object_accuracy_by_relative_position"]
    decay = quarters[:, 0] - quarters[:, -1]  # first minus last quarter, per seed
    agg["position_decay"] = (float(decay.mean()), float(decay.std()), len(vals))
    out[name] = agg
  return out


def reference(name: str, group: str) -> str:
  """The variant a row is compared with: the group's full model on the same backbone, or the paper's baseline."""
  if group == "conditioners":
    return "unet_lidit" if name.startswith("unet_") else "lidit"
  return {"random": "baseline", "lidit": "lidit", "position": "pos_lm"}[group]


def versus(a: tuple, b: tuple) -> str:
  """Difference of two (mean, std, n) accuracies; `*` where it exceeds the spread (mean ± std ranges apart), which
  one seed cannot show."""
  d = a[0] - b[0]
  return f"{d:+.3f}{' *' if min(a[2], b[2]) > 1 and abs(d) > a[1] + b[1] else ''}"


def table(agg: dict, group: str, steps: int, num_prompts: int) -> str:
  names = [n for n in agg if group in VARIANTS[n].groups]
  cell = lambda mean, std: f"{mean:.3f} ± {std:.3f}"
  ref = lambda n: reference(n, group)
  delta = lambda n: ("(reference)" if n == ref(n) else
                     versus(agg[n]["object_accuracy"], agg[ref(n)]["object_accuracy"]) if ref(n) in agg else "-")
  if group == "position":
    heads = [HEADS[m] for m in LONG_METRICS] + [f"phrases at {b}" for b in POSITION_BINS]
    rows = []
    for n in names:
      a = agg[n]
      mean, std, _ = a["object_accuracy_by_relative_position"]
      cells = [cell(*a[m][:2]) for m in LONG_METRICS] + [cell(m, s) for m, s in zip(mean, std)]
      cells.append(cell(*a["position_decay"][:2]))
      rows.append((n, cells + [delta(n)], a[METRICS[0]][2]))
    heads += ["first - last quarter"]
    intro = (f"Prompts of 2 to 6 attribute-object phrases drawn like the training data ({num_prompts} per run), "
             f"{steps} training steps per run; object accuracy by the phrase's relative position k / (n - 1). "
             f"The paper's positional bias is a positive first - last quarter.")
  else:
    heads = [HEADS[m] for m in METRICS]
    rows = [(n, [cell(*agg[n][m][:2]) for m in METRICS] + [delta(n)], agg[n][METRICS[0]][2]) for n in names]
    intro = f"Held-out three-object prompts ({num_prompts} per run), {steps} training steps per run."
  heads += ["object vs " + ("LI-DiT on its backbone" if group == "conditioners" else ref(names[0]))]
  head = ("| variant | what it tests | " + " | ".join(heads) + " | seeds |\n|" + "---|" * (len(heads) + 3) + "\n")
  body = "\n".join(f"| {n} | {VARIANTS[n].what} | {' | '.join(cells)} | {k} |" for n, cells, k in rows)
  return (f"## {group}\n\n{intro} Mean ± standard deviation over seeds; `*` marks a difference larger than the two "
          f"spreads together (needs two seeds or more).\n\n{head}{body}\n")


def cost(runs: dict) -> str:
  """The runs' wall time (training + evaluation) and CPU-hours (wall time x the machine's cores), where recorded."""
  timed = [r for per_seed in runs.values() for r in per_seed.values() if "seconds" in r]
  if not timed:
    return ""
  hours = sum(r["seconds"] for r in timed) / 3600
  cpu = sum(r["seconds"] * r["cpu_cores"] for r in timed) / 3600
  return (f"\nCost: {len(timed)} timed runs, {hours:.1f} h wall, {cpu:.1f} CPU-hours "
          f"({timed[0]['cpu_cores']} cores){'' if len(timed) == sum(map(len, runs.values())) else '; older runs untimed'}.\n")


def plot(agg: dict, path: str):
  import matplotlib  # local: plots only
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # local: plots only
  groups = [g for g in GROUPS if any(g in VARIANTS[n].groups for n in agg)]
  fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
  for ax, g in zip(axes[0], groups):
    names = [n for n in agg if g in VARIANTS[n].groups]
    for k, name in enumerate(names):
      mean, std, _ = agg[name]["object_accuracy_by_relative_position"]
      x = np.arange(len(mean)) + (k - len(names) / 2) * 0.03  # small offsets keep error bars apart
      ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(POSITION_BINS)), POSITION_BINS)
    ax.set_xlabel("relative position of the phrase in the prompt")
    ax.set_ylabel("object accuracy (colour and shape right)")
    ax.set_title(f"{g}: prompt following by phrase position")
    ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
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
    print(f"[ablate] {v} seed {s}: {VARIANTS[v].what}", flush=True)
    runs[v][s] = run_one(config, os.path.join(out, v, f"seed_{s}"), num_prompts, VARIANTS[v].prompts,
                         keep_checkpoints)
  agg = aggregate(runs)
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"steps": steps, "num_prompts": num_prompts, "seeds": seeds, "base": base,
               "runs": {v: {str(s): r for s, r in rs.items()} for v, rs in runs.items()}, "aggregate": agg}, f, indent=2)
  groups = [g for g in GROUPS if any(g in VARIANTS[v].groups for v in variants)]
  with open(os.path.join(out, "ablation.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(table(agg, g, steps, num_prompts) for g in groups) + cost(runs))
  plot(agg, os.path.join(out, "position.png"))
  return agg


def main(argv):
  f = flags.FLAGS
  groups = [g.strip() for g in f.groups.split(",") if g.strip()]
  if set(groups) - set(GROUPS):
    raise UserError(f"--groups: unknown group(s) {sorted(set(groups) - set(GROUPS))}. Fix: choose from "
                    f"{', '.join(GROUPS)}")
  variants = [v.strip() for v in f.variants.split(",") if v.strip()] or variants_of(groups)
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
  from lidit_jax import cli
  flags.DEFINE_string("out", "runs/ablate", "Output directory (finished runs in it are reused).")
  flags.DEFINE_string("config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "shapes.py"),
                      "Base config (file[:variants]); each variant adds its own variants and overrides.")
  flags.DEFINE_string("groups", "lidit,conditioners,position", "Comma-separated groups: " + ", ".join(GROUPS))
  flags.DEFINE_string("variants", "", "Comma-separated variants instead of whole groups: " + ", ".join(VARIANTS))
  flags.DEFINE_string("seeds", "0,1", "Comma-separated seeds (model init, data and noise).")
  flags.DEFINE_integer("steps", 600, "Training steps per run.")
  flags.DEFINE_integer("num_prompts", 128, "Evaluation prompts per run.")
  flags.DEFINE_bool("keep_checkpoints", False, "Keep each run's checkpoints after its evaluation.")
  cli.run(main)
