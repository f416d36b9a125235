"""Bad input and faults: one clear message (exit status 2, no traceback) or a correct recovery, nothing lost."""
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidit_jax import checkpoint, configs, state as state_lib, train
from lidit_jax.objectives import flow
from lidit_jax.convert import tiny_models

from conftest import ROOT, tiny_config

TINY = str(ROOT / "configs/shapes.py:tiny")


def run_cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                        env=env)


def assert_user_error(r, *needles):
  """Exit status 2, one `error:` line naming the problem, no Python traceback."""
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  for n in needles:
    assert n in errors[0], errors[0]


def truncate_files(directory, keep=0.5):
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "r+b") as fh:
        fh.truncate(int(os.path.getsize(p) * keep))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run with checkpoints at steps 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(tiny_config(**{"train.checkpoint_every": 3}), workdir)
  return workdir


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
  """A truncated safetensors file and an unsupported architecture, both otherwise valid HF directories."""
  out = tmp_path_factory.mktemp("hf")
  good = tiny_models.write_tiny_model(str(out / "llama"), "llama")
  shutil.copytree(good, out / "truncated")
  truncate_files(out / "truncated", keep=1.0)
  st = out / "truncated" / "model.safetensors"
  with open(st, "r+b") as fh:
    fh.truncate(os.path.getsize(st) // 2)
  shutil.copytree(good, out / "gpt2")
  cfg = json.loads((out / "gpt2" / "config.json").read_text())
  (out / "gpt2" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  return out


USER_ERRORS = {
    "bad value": (["lidit_jax.train", "--config", TINY, "--workdir", "{tmp}/w", "--config.model.width=33"],
                  ["model.width=33", "Fix:"]),
    "unknown key": (["lidit_jax.train", "--config", TINY, "--workdir", "{tmp}/w", "--config.optim.learning_rat=1"],
                    ["unknown config key 'optim.learning_rat'", "lr"]),
    "unknown key (demo)": (["lidit_jax", "--config", TINY, "--workdir", "{tmp}/w", "--config.modle.depth=2"],
                           ["'modle'", "did you mean 'model'"]),
    "wrong type": (["lidit_jax.plan", "--config", TINY, "--config.model.depth=deep"], ["--config.model.depth=deep"]),
    "missing config file": (["lidit_jax", "--config", "{tmp}/nope.py", "--workdir", "{tmp}/w"],
                            ["nope.py' does not exist", "Fix:"]),
    "missing config file + override": (["lidit_jax.evaluate", "--config", "{tmp}/nope.py", "--workdir", "{tmp}/w",
                                        "--config.eval.steps=2"], ["nope.py' does not exist"]),
    "unknown variant": (["lidit_jax.model", "--config", str(ROOT / "configs/shapes.py:huge")], ["unknown variant"]),
    "missing checkpoint (sample)": (["lidit_jax.sample", "--config", TINY, "--workdir", "{tmp}/empty", "--prompt",
                                     "a red circle"], ["no checkpoint in", "train first"]),
    "missing checkpoint (evaluate)": (["lidit_jax.evaluate", "--config", TINY, "--workdir", "{tmp}/empty"],
                                      ["no checkpoint in"]),
    "unknown flag": (["lidit_jax.train", "--config", TINY, "--workdir", "{tmp}/w", "--num_steps=3"],
                     ["num_steps"]),
    "missing tower directory": (["lidit_jax.encode_prompts", "--config", TINY, "--out", "{tmp}/c",
                                 "--config.text.towers.llama_a.init={tmp}/nowhere"], ["is not a directory"]),
    "truncated safetensors (convert)": (["lidit_jax.convert", "hf-text", "{hf}/truncated", "{tmp}/out"],
                                        ["model.safetensors", "truncated"]),
    "truncated safetensors (train)": (["lidit_jax.train", "--config", TINY, "--workdir", "{tmp}/w",
                                       "--config.text.towers.llama_a.init={hf}/truncated"], ["truncated"]),
    "unsupported model": (["lidit_jax.convert", "hf-text", "{hf}/gpt2", "{tmp}/out"], ["model_type='gpt2'"]),
    "latents without a dataset": (["lidit_jax.data.latents", "--config", TINY, "--out", "{tmp}/d", "--name", "x",
                                   "--config.data.source=tfds"], ["data.name/data_dir"]),
    "prepare from nothing": (["lidit_jax.data.prepare", "--src", "{tmp}/none", "--out", "{tmp}/d"],
                             ["--src", "Fix:"]),
    "ablation variant": (["lidit_jax.experiments.ablate", "--out", "{tmp}/a", "--variants", "bogus"],
                         ["unknown variant(s) ['bogus']"]),
    "ablation group": (["lidit_jax.experiments.ablate", "--out", "{tmp}/a", "--groups", "lidit,bogus"],
                       ["unknown group(s) ['bogus']", "position"]),
    "sample --steps 0": (["lidit_jax.sample", "--config", TINY, "--workdir", "{tmp}/empty", "--prompt", "a red circle",
                          "--steps", "0"], ["--steps=0"]),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_are_one_message_and_exit_status_2(case, tmp_path, bad_models):
  args, needles = USER_ERRORS[case]
  r = run_cli(*[a.format(tmp=tmp_path, hf=bad_models) for a in args])
  assert_user_error(r, *needles)


def test_debug_shows_the_traceback(tmp_path):
  args = ["lidit_jax.train", "--config", TINY, "--workdir", str(tmp_path), "--config.model.width=33"]
  r = run_cli(*args, "--debug")
  assert r.returncode != 0 and "Traceback" in r.stderr and "model.width=33" in r.stderr
  r = run_cli(*args, env={**os.environ, "LIDIT_DEBUG": "1"})
  assert r.returncode != 0 and "Traceback" in r.stderr


def test_a_short_run_clips_the_warmup_and_grad_clip_0_means_no_clipping(tmp_path, capsys):
  demo = configs.load_config_file(str(ROOT / "configs" / "shapes.py"))
  demo.train.num_steps = 20
  assert configs.validate(demo).optim.warmup_steps == 2  # the demo's 100 clipped to a tenth of the run
  assert "warming up for 2 steps instead" in capsys.readouterr().err
  config = tiny_config(**{"train.num_steps": 20, "optim.warmup_steps": 100, "optim.grad_clip": 0.0,
                          "train.log_every": 1, "train.sample_every": 20})
  rows = train_logging_every_step(config, tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 21))
  # clip_by_global_norm(0) would have zeroed every update: the parameters would never move.
  assert len({round(r["param_norm"], 6) for r in rows}) > 10


def train_logging_every_step(config, workdir):
  """Train with each step >= 50 ms on the device (a host callback inside the step) and each log write 40 ms
  on the host. Timing at dispatch, one step behind, logged up to ~100 steps/s here; finished steps give <= 20,
  so no logged MFU can exceed the true one."""
  mp = pytest.MonkeyPatch()
  real_loss, real_write = flow.loss_terms, train.MetricsLog.write

  def slow_loss(*args, **kwargs):
    jax.debug.callback(lambda: time.sleep(0.05))
    return real_loss(*args, **kwargs)

  def slow_write(self, step, metrics):
    time.sleep(0.04)
    real_write(self, step, metrics)
  mp.setattr(flow, "loss_terms", slow_loss)
  mp.setattr(train.MetricsLog, "write", slow_write)
  try:
    train.train_and_evaluate(config, str(workdir))
  finally:
    mp.undo()
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert max(r["steps_per_sec"] for r in rows) <= 20.0, [r["steps_per_sec"] for r in rows]
  assert max(r["mfu"] for r in rows) <= 1.0
  return rows


def test_grad_clip_0_updates_like_plain_adamw():
  config = tiny_config(**{"optim.grad_clip": 0.0, "optim.warmup_steps": 0})
  tx, schedule = state_lib.make_optimizer(config)
  params = {"w": {"kernel": jnp.ones((3, 4))}}
  grads = {"w": {"kernel": jnp.full((3, 4), 50.0)}}  # global norm 173: clipping would change it
  updates, _ = tx.update(grads, tx.init(params), params)
  import optax
  ref = optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2, weight_decay=config.optim.weight_decay)
  want, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(updates["w"]["kernel"], want["w"]["kernel"], rtol=1e-6)
  assert float(jnp.abs(updates["w"]["kernel"]).min()) > 0


def test_resume_with_changed_shapes_is_refused_before_compute(trained, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  r = run_cli("lidit_jax.train", "--config", TINY, "--workdir", workdir, "--config.model.width=64",
              "--config.train.num_steps=9")
  assert_user_error(r, "step 6", "params/", "shape", "Fix:")
  assert "train:" not in r.stderr  # refused before the first step
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, capsys):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  truncate_files(os.path.join(workdir, "checkpoints", "6"))
  train.train_and_evaluate(tiny_config(**{"train.checkpoint_every": 3, "train.num_steps": 9}), workdir)
  err = capsys.readouterr().err
  assert "checkpoint step 6" in err and "falling back to step 3" in err
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["3", "6", "9"]
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged")) == ["6"]  # kept for inspection
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == [2, 4, 6, 8, 9]  # lines past step 3 were rewritten by the resumed run


def test_a_save_that_cannot_fit_stops_with_one_message_and_keeps_the_last_good_one(tmp_path, monkeypatch, capfd):
  """A full disk at the step-3 save (simulated free space): the step-2 checkpoint stays and resumes."""
  workdir = str(tmp_path / "w")
  real = shutil.disk_usage
  calls = {"n": 0}

  def disk_usage(path):
    calls["n"] += 1
    usage = real(path)
    return usage._replace(free=usage.free if calls["n"] < 3 else 1024)
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", disk_usage)
  config = tiny_config(**{"train.checkpoint_every": 1})
  with pytest.raises(checkpoint.SaveError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert "step 3" in message and "the last good checkpoint is step 2" in message and "disk is full" in message
  assert os.path.join(workdir, "checkpoints") in message
  assert "Traceback" not in capfd.readouterr().err
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", real)
  s = state_lib.setup(config)
  ckpt = checkpoint.Checkpoints(workdir)
  state, _ = ckpt.restore(s.abstract_state)
  ckpt.close()
  assert int(state.step) == 2


def mount_tmpfs(path, size):
  path.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
  if r.returncode:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")


@pytest.mark.slow
def test_a_real_full_disk_stops_with_one_message(tmp_path):
  """A 6 MiB tmpfs holds the tiny run's first checkpoints only. The check before each save is turned off, so
  Orbax's writers really hit the full disk part way (the check itself: the test above)."""
  disk = tmp_path / "disk"
  mount_tmpfs(disk, "6m")
  try:
    script = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
              "from conftest import tiny_config\nfrom lidit_jax import checkpoint, cli, train\n"
              "checkpoint.Checkpoints._check_space = lambda self, state: None\n"
              "with cli.user_errors():\n"
              f"  train.train_and_evaluate(tiny_config(**{{'train.checkpoint_every': 1}}), {str(disk / 'w')!r})\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert_user_error(r, "disk is full", str(disk / "w" / "checkpoints"), "the last good checkpoint is step")
  finally:
    subprocess.run(["umount", str(disk)])


def test_unknown_prompt_words_are_named(caplog):
  from lidit_jax import model as model_lib
  towers = model_lib.build_towers(tiny_config())
  with caplog.at_level("WARNING", logger="lidit_jax.prompt"):
    towers[0].encoder(["a red circle beside a mauve hexagon"])
  assert "'beside', 'mauve', 'hexagon'" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="lidit_jax.prompt"):
    towers[0].encoder(["a red circle to the left of a blue square"])
  assert "does not know" not in caplog.text
