"""The embedded demo, end to end: `python -m lidit_jax [--workdir runs/shapes]`.

Trains configs/shapes.py (resuming if the workdir has a checkpoint), samples the config's prompts into
WORKDIR/demo_samples.png, and evaluates prompt following on held-out compositions (WORKDIR/eval.json).
Any `--config.key=value` override works as in `python -m lidit_jax.train`.
"""
import json
import os
import shutil

from absl import flags, logging
from etils import epath

from lidit_jax import checkpoint, cli, configs, distributed, evaluate, state, train
from lidit_jax.pipeline import Pipeline, Workdir

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shapes.py")


def trained_steps(workdir: str) -> int:
  """The step of the workdir's latest checkpoint (0 without one)."""
  if not epath.Path(checkpoint.checkpoint_dir(workdir)).is_dir():
    return 0
  ckpt = checkpoint.Checkpoints(workdir)
  try:
    return ckpt.latest_step() or 0
  finally:
    ckpt.close()


def main(argv):
  distributed.initialize()  # first: several processes (TPU VM workers, GPU nodes) become one runtime
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  config = configs.load_from_flags()
  workdir = f.workdir
  print(f"[1/3] training into {workdir} (resumes if it holds a checkpoint)")
  train.train_and_evaluate(config, workdir)
  reached = trained_steps(workdir)
  if reached < config.train.num_steps:  # stopped early (SIGTERM: preemption): the rest waits for the resumed run
    print(f"      stopped at step {reached} of {config.train.num_steps}: re-run the same command to resume; "
          "sampling and evaluation come after the last step")
    return
  pipe = Pipeline(Workdir.of(*state.restore_for_inference(config, workdir)))
  step = pipe.backend.step
  print("[2/3] samples of the config's prompts (EMA weights, written at the last training step)")
  prompts = list(config.sample.prompts)
  path = os.path.join(workdir, "demo_samples.png")
  shutil.copyfile(os.path.join(workdir, "samples", f"step_{step:07d}.png"), path)
  print(f"      {path} (one row per prompt: {'; '.join(prompts)})")
  print("[3/3] evaluating on held-out prompts")
  e = config.eval
  result = evaluate.evaluate(pipe, e.num_prompts, e.steps, e.cfg, batch_size=e.batch_size, out_dir=workdir,
                             num_probe_pairs=e.probe_pairs, scene_seed=config.seed)
  result["checkpoint_step"] = step
  with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=2)
  keys = ("colour_accuracy", "shape_accuracy", "relation_accuracy", "prompt_accuracy",
          "count_accuracy", "relation_sensitivity")
  print("      " + ", ".join(f"{k}={result[k]:.3f}" for k in keys))
  print(f"      {os.path.join(workdir, 'eval.json')}, {os.path.join(workdir, 'eval_grid.png')}")


if __name__ == "__main__":
  configs.define_flags(default=DEMO_CONFIG)
  flags.declare_key_flag("config")  # list --config under --help
  flags.DEFINE_string("workdir", "runs/shapes", "Run directory (resumed if it holds a checkpoint).")
  cli.run(main)
