"""Training library: `train_and_evaluate(config, workdir)`; `python -m lidit_jax.train` is its entry point.

  python -m lidit_jax.train --config configs/shapes.py --workdir runs/shapes [--config.train.num_steps=500]

A run resumes from the latest checkpoint in its workdir (train state + data iterator state). Metrics go to
WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events in WORKDIR/tb; sample
grids to WORKDIR/samples/. A non-finite loss stops the run naming the step; the last good checkpoint stays.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from absl import flags
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from lidit_jax import chips
from lidit_jax import cli
from lidit_jax import configs
from lidit_jax import distributed
from lidit_jax import lock
from lidit_jax import outputs
from lidit_jax import resume
from lidit_jax import sharding
from lidit_jax import checkpoint as ckpt_lib
from lidit_jax import pipeline as pipeline_lib
from lidit_jax import plan as plan_lib
from lidit_jax import sample as sample_lib
from lidit_jax import state as state_lib
from lidit_jax.data import pipeline
from lidit_jax.sharding import device_batch
from lidit_jax.train_step import clean_latents, ema_decay, lower_train_step, make_train_step  # noqa: F401
from lidit_jax.validation import Validation


class MetricsLog:
  """metrics.jsonl + TensorBoard, written from process 0 only. On resume, lines past the restored step go.
  The workdir may be a bucket (gs://...): the file is rewritten whole (objects cannot be appended to), and
  TensorBoard events, which need a local filesystem, are skipped there."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb = None
    self.lines: list[str] = []
    if not self.enabled:
      return
    if self.path.exists():
      self.lines = [l + "\n" for l in self.path.read_text(encoding="utf-8").splitlines()
                    if l.strip() and json.loads(l)["step"] <= resume_step]
      tmp = self.path.parent / "metrics.jsonl.tmp"  # renamed over the old file: a crash here loses no line
      tmp.write_text("".join(self.lines), encoding="utf-8")
      tmp.replace(self.path)
    if "://" not in workdir:
      from tensorboardX import SummaryWriter  # local: the trainer's event files only
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    self.lines.append(json.dumps({"step": step, **metrics}) + "\n")
    if "://" in str(self.path):
      self.path.write_text("".join(self.lines), encoding="utf-8")
    else:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(self.lines[-1])
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(k, v, step)
      self.tb.flush()

  def image(self, tag: str, image, step: int):
    """An image (uint8 [H, W, 3], or a PNG's path: a sample grid) to TensorBoard's images."""
    if self.tb is not None:
      if isinstance(image, str):
        with Image.open(image) as img:
          image = np.asarray(img.convert("RGB"))
      self.tb.add_image(tag, image, step, dataformats="HWC")
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def save_samples(pipe, params, workdir: str, step: int):
  """The config's prompts drawn with `params` through `pipe` (a Pipeline on the run's Setup: compiled once)."""
  config = pipe.backend.setup.config
  prompts = list(config.sample.prompts)
  imgs = sample_lib.generate_images(pipe.with_weights(params, step), prompts, config.sample.num_images, seed=config.seed)
  if jax.process_index() == 0:
    path = str(epath.Path(workdir) / "samples" / f"step_{step:07d}.png")
    sample_lib.save_grid(imgs.reshape(-1, *imgs.shape[2:]), path, cols=config.sample.num_images)
    (epath.Path(workdir) / "samples" / "prompts.txt").write_text(
        "One row per prompt:\n" + "\n".join(prompts) + "\n", encoding="utf-8")
    return path


class StopRequest:
  """SIGTERM (how schedulers and spot / preemptible VMs announce preemption) or the first Ctrl-C (SIGINT) -> save
  at the step reached and leave cleanly; a second Ctrl-C exits at once (status 130). With several
  processes all must stop at the same step: JAX's preemption sync point (the coordination service watches for
  SIGTERM on every host) decides instead of the local flag, and Ctrl-C keeps its default there."""

  def __init__(self):
    self.signum = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGTERM,)
      self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT:
      if self.signum is not None:  # the second Ctrl-C: leave now. Not by raising KeyboardInterrupt, which lands
        # wherever Python is (a GC callback swallows it); the last good checkpoint is untouched (Orbax writes
        # each step under a temporary name) and the lock left behind is taken over by the next run
        print("\ninterrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(cli.EXIT_INTERRUPTED)
      print("\nCtrl-C: saving once this step is done (press Ctrl-C again to exit at once, without saving)",
            file=sys.stderr, flush=True)
    self.signum = signum

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption service in this cluster set-up: fall back to the signal
        pass
    return self.signum is not None

  @property
  def reason(self) -> str:
    return "Ctrl-C" if self.signum == signal.SIGINT else "SIGTERM"

  def close(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def prepare_workdir(workdir: str) -> None:
  """Create WORKDIR, or check that an existing one is a run's (or empty): a trainer writes config.json,
  metrics.jsonl, tb/, samples/ and checkpoints/ there, and must not replace a user's files of those names."""
  path = epath.Path(workdir)
  if "://" in workdir:  # a bucket
    path.mkdir(parents=True, exist_ok=True)
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ckpt_lib.UserError(f"--workdir {workdir} is a file, not a directory. Fix: pass a directory (a new one, "
                             "or a run's workdir to resume it)")
  if os.path.isdir(workdir):
    entries = set(os.listdir(workdir)) - {lock.NAME}
    if entries and not is_workdir(workdir):
      listed = ", ".join(sorted(entries)[:5])
      raise ckpt_lib.UserError(f"--workdir {workdir} holds files that are not a training run's ({listed}): a run "
                               "writes config.json, metrics.jsonl, tb/, samples/ and checkpoints/ there. Fix: pass "
                               "a new or empty directory, or a run's workdir to resume it")
    return
  outputs.make_parent(os.path.join(workdir, "config.json"))


def is_workdir(path: str) -> bool:
  """A training run's directory: checkpoints/, or the config.json a trainer wrote (a config's sections)."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return True
  try:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(saved, dict) and {"model", "train", "text"} <= set(saved)


def train_and_evaluate(config, workdir: str) -> dict:
  """Train (resuming from workdir if possible); returns the last logged metrics. The workdir is locked for the
  run: a second trainer on it is refused with this one's host and pid."""
  prepare_workdir(workdir)
  with lock.held(workdir, "train", enabled=jax.process_index() == 0):
    return _train(config, workdir)


def _train(config, workdir: str) -> dict:
  t = config.train
  with contextlib.ExitStack() as closing:  # also on Ctrl-C or an error: an in-flight checkpoint save finishes
    ckpt = ckpt_lib.Checkpoints(workdir, keep=t.keep_checkpoints, keep_every=t.keep_every)
    closing.callback(ckpt.close)
    # A change of meaning (objective, towers, ...) is refused before any compute; a change of shapes by name
    changed = resume.check(config, workdir, ckpt.latest_step(),
                           lambda: ckpt.check_shapes(state_lib.setup(config, abstract=True).abstract_state))
    data = pipeline.make_batches(config, text_for=None)  # a missing or corrupt dataset fails before any compute
    closing.callback(data.close)
    held = pipeline.held_out(config, text_for=None) if t.eval_every else None  # so does a missing held-out split
    held_batches = None
    s = state_lib.setup(config)
    data.text_for = s.text_for
    if held is not None:
      held.text_for = s.text_for
      held_batches = [next(held) for _ in range(t.eval_batches)]
      held.close()
    restored = ckpt.restore(s.abstract_state)
    if restored is None:
      state = s.init_state(jax.random.key(config.seed))
    else:
      state, data_state = restored
      data.restore(data_state)
    start = int(state.step)
    if jax.process_index() == 0:
      resume.write_config(config, workdir, start, changed)
    return _loop(config, workdir, s, state, data, ckpt, closing, held_batches)


def _loop(config, workdir, s, state, data, ckpt, closing, held_batches=None) -> dict:
  t, start = config.train, int(state.step)
  log = MetricsLog(workdir, start)
  closing.callback(log.close)
  step_fn = make_train_step(s)
  pipe = pipeline_lib.Pipeline(pipeline_lib.Workdir.of(s))
  validation = Validation(s, held_batches, pipe) if held_batches else None
  rng = jax.random.key(config.seed + 2)
  # The towers' configs are already at hand: no second read of their checkpoints' config.json.
  hw = (config.data.image_size,) * 2
  encode = s.autoencoder.encode_flops(s.frozen["autoencoder"], hw) if s.autoencoder else 0.0
  flops = plan_lib.step_flops(config, {t.name: (None, t.module.cfg) for t in s.towers}, encode)
  step_tflop = (flops["train"] + flops["towers"] + flops["autoencoder"]) / 1e12
  peak = chips.CHIP_PEAK_TFLOPS.get(chips.chip_of(jax.devices()[0]))

  bar = tqdm(total=t.num_steps, initial=start, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
  closing.callback(bar.close)
  window, last, pending = [], {}, None
  t_window = time.perf_counter()

  def finish(step_done: int, metrics):
    """Host-side bookkeeping of a finished step (one step behind dispatch, so the device stays busy)."""
    nonlocal t_window, window, last
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])  # blocks until the step is done
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):  # a non-finite gradient poisons the weights
      ckpt.wait()
      raise FloatingPointError(
          f"non-finite loss {loss} (gradient norm {grad_norm}) at step {step_done}. The last good checkpoint (step {ckpt.latest_step()}) is "
          f"kept in {ckpt.directory}. Fix: lower --config.optim.lr or --config.optim.grad_clip, or use float32.")
    window.append({k: float(v) for k, v in metrics.items()})
    bar.update(1)
    if step_done % t.log_every == 0 or step_done == t.num_steps:
      # A log step is finished on the step just dispatched (see the loop), so the window holds the whole
      # execution of its steps: the rate is never faster than the device (no MFU above 1).
      now = time.perf_counter()
      dt = now - t_window
      last = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
      last.update(steps_per_sec=len(window) / dt, examples_per_sec=len(window) * t.batch_size / dt)
      last.update(data.counters())  # records skipped at read time (corrupt images), by reason
      last["tflops_per_device"] = step_tflop * last["steps_per_sec"] / jax.device_count()
      if peak:  # model FLOPs utilization against the chip's dense peak (plan.CHIP_PEAK_TFLOPS)
        last["mfu"] = last["tflops_per_device"] / peak
      log.write(step_done, last)
      bar.set_postfix(loss=f"{last['loss']:.4f}", steps_s=f"{last['steps_per_sec']:.2f}")
      window, t_window = [], now

  stop = StopRequest()
  closing.callback(stop.close)
  for step in range(start, t.num_steps):
    batch = device_batch(next(data), s.mesh)
    state, metrics = step_fn(state, s.frozen, batch, rng)
    done = step + 1
    if pending is not None:
      finish(*pending)
    pending = (done, metrics)
    stopping = stop(done)
    evaluating = validation is not None and done % t.eval_every == 0
    if (stopping or evaluating or done == t.num_steps or done % t.log_every == 0 or done % t.checkpoint_every == 0
        or done % t.sample_every == 0):
      finish(*pending)  # wait for this step: log what finished, save what is done
      pending = None
    if stopping:
      ckpt.save(done, state, data.state(), config, force=True)
      ckpt.wait()
      bar.write(f"stopped ({stop.reason}): saved step {done} in {ckpt.directory}; re-run the same command "
                "to resume")
      break
    if done % t.checkpoint_every == 0 or done == t.num_steps:
      ckpt.save(done, state, data.state(), config, force=True)
    if evaluating:
      scores = validation(state.ema_params, done)
      log.write(done, scores)
      if validation.images is not None:
        log.image("validation", sample_lib.grid(validation.images[:16]), done)
      bar.write(f"step {done}: " + ", ".join(f"{k} {v:.5f}" for k, v in scores.items()))
    if done % t.sample_every == 0 or done == t.num_steps:
      path = save_samples(pipe, s.model_params(state.ema_params), workdir, done)
      if path:
        log.image("samples", path, done)
        bar.write(f"step {done}: samples -> {path}")
  if pending is not None:
    finish(*pending)
  return last


def main(argv):
  distributed.initialize()  # first: several processes (TPU VM workers, GPU nodes) become one runtime
  config = configs.load_from_flags()
  train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
  configs.define_flags()
  flags.declare_key_flag("config")  # list --config under --help
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/, samples/.", required=True)
  cli.run(main)
