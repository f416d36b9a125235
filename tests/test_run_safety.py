"""Nothing lost (issue 32, the run's side): checkpoints kept, one trainer per workdir, Ctrl-C saves, a resume that
changes what the model means refused by field, the Python API validating like the CLI, workdir messages."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from lidit_jax import configs, lock, outputs, train
from lidit_jax.pipeline import Pipeline

from conftest import ROOT, tiny_config

TINY = str(ROOT / "configs/shapes.py:tiny")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run with checkpoints at steps 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(tiny_config(), workdir)
  return workdir


def copy_of(trained, tmp_path) -> str:
  workdir = str(tmp_path / "w")
  shutil.copytree(trained, workdir)
  return workdir


def steps_in(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int)


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_checkpoints_below_1_is_refused_before_any_checkpoint_goes(trained, tmp_path, keep):
  workdir = copy_of(trained, tmp_path)
  with pytest.raises(configs.ConfigError, match=rf"train.keep_checkpoints={keep}: must be at least 1"):
    train.train_and_evaluate(tiny_config(**{"train.keep_checkpoints": keep, "train.num_steps": 9}), workdir)
  assert steps_in(workdir) == ["3", "6"]


def test_a_second_process_holding_the_workdir_refuses_the_trainer(tmp_path):
  """A real second process holds the lock: the trainer is refused with its host and pid and writes nothing."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from lidit_jax import lock\n"
       f"with lock.held({str(workdir)!r}, 'train'):\n  print('held', flush=True); time.sleep(120)"],
      stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(lock.LockedError) as e:
      train.train_and_evaluate(tiny_config(), str(workdir))
    assert f"pid {holder.pid} on host {socket.gethostname()}" in str(e.value) and "Fix:" in str(e.value)
    assert sorted(os.listdir(workdir)) == [lock.NAME]  # no config.json, no checkpoints written
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock is stale and is taken over with a warning.
  with lock.held(str(workdir), "train") as taken:
    assert lock.holder(str(workdir)) == taken.info
  assert not os.path.exists(workdir / lock.NAME)  # released at the end


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  (tmp_path / lock.NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                "command": "train", "started": "yesterday"}))
  assert lock.holder(str(tmp_path)) is None
  with lock.held(str(tmp_path), "train"):
    pass
  err = capsys.readouterr().err
  assert f"pid {int(dead.stdout)}" in err and "taking the lock over" in err
  # another host's lock is live while its heartbeat is fresh, stale after STALE_S
  (tmp_path / lock.NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "command": "train"}))
  assert lock.holder(str(tmp_path))["host"] == "elsewhere"
  old = time.time() - lock.STALE_S - 5
  os.utime(tmp_path / lock.NAME, (old, old))
  assert lock.holder(str(tmp_path)) is None


def start_training(workdir, *flags):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, "-m", "lidit_jax.train", "--config", TINY, "--workdir", workdir,
                           "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000",
                           "--config.train.sample_every=100000", "--config.train.log_every=1", *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def wait_for_steps(proc, workdir, n=2, timeout=300):
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= n:
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.2)
  raise AssertionError("the trainer logged no steps")


def test_ctrl_c_saves_the_step_reached_and_a_second_exits_at_once(tmp_path):
  """A real SIGINT: the first saves the step reached and exits 0 with no traceback; the resumed run goes on from
  it. Pressed twice, the trainer exits at once with status 130 and one line."""
  workdir = str(tmp_path / "w")
  proc = start_training(workdir)
  wait_for_steps(proc, workdir)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  saved = steps_in(workdir)
  assert len(saved) == 1 and int(saved[0]) >= 2
  assert f"stopped (Ctrl-C): saved step {saved[0]}" in out and "Ctrl-C: saving once this step is done" in err
  assert not os.path.exists(os.path.join(workdir, lock.NAME))

  proc = start_training(workdir)
  wait_for_steps(proc, workdir, n=int(saved[0]) + 2)  # resumed past the saved step
  proc.send_signal(signal.SIGINT)
  time.sleep(0.3)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted (Ctrl-C)"


def test_resuming_with_a_changed_meaning_is_refused_by_field(trained, tmp_path):
  """flow.prediction x0 -> velocity keeps every shape: refused by name unless allowed, then recorded."""
  workdir = copy_of(trained, tmp_path)
  saved_config = open(os.path.join(workdir, "config.json")).read()
  changed = {"flow.prediction": "velocity", "flow.loss": "velocity", "train.num_steps": 9}
  with pytest.raises(configs.ConfigError) as e:
    train.train_and_evaluate(tiny_config(**changed), workdir)
  assert "flow.prediction: 'x0' -> 'velocity'" in str(e.value) and "allow_config_change=True" in str(e.value)
  assert "train.num_steps" not in str(e.value)  # harmless: not a reason to refuse
  assert steps_in(workdir) == ["3", "6"] and open(os.path.join(workdir, "config.json")).read() == saved_config

  train.train_and_evaluate(tiny_config(**changed, **{"train.allow_config_change": True}), workdir)
  assert steps_in(workdir)[-1] == "9"
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["flow"]["prediction"] == "velocity"
  assert saved["history"] == [{"step": 6, "changed": {"flow.loss": ["x0", "velocity"],
                                                      "flow.prediction": ["x0", "velocity"],
                                                      "train.allow_config_change": [False, True],
                                                      "train.num_steps": [6, 9]}}]
  assert configs.read_saved(workdir).flow.prediction == "velocity"  # the history is not a config field


def test_harmless_changes_are_listed_in_one_line_keep_1_keeps_the_newest_and_the_lock_is_held(trained, tmp_path,
                                                                                                capsys, monkeypatch):
  seen = []
  real = train.save_samples

  def spy(pipe, params, workdir, step):
    seen.append(lock.holder(workdir))
    return real(pipe, params, workdir, step)
  monkeypatch.setattr(train, "save_samples", spy)
  workdir = copy_of(trained, tmp_path)
  train.train_and_evaluate(tiny_config(**{"train.num_steps": 9, "optim.lr": 3e-4, "train.keep_checkpoints": 1}),
                           workdir)
  lines = [l for l in capsys.readouterr().err.splitlines() if "resuming at step 6" in l]
  assert len(lines) == 1 and "optim.lr 0.0015 -> 0.0003" in lines[0] and "train.num_steps 6 -> 9" in lines[0]
  assert steps_in(workdir) == ["9"]
  assert seen and seen[0]["pid"] == os.getpid() and seen[0]["command"] == "train"  # held while it ran
  assert lock.holder(workdir) is None and not os.path.exists(os.path.join(workdir, lock.NAME))  # released


def test_a_changed_shape_is_still_refused_with_the_parameter_named(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  with pytest.raises(Exception, match=r"params/.*shape"):
    train.train_and_evaluate(tiny_config(**{"model.width": 64, "train.allow_config_change": False}), workdir)


@pytest.fixture(scope="module")
def pipe(trained):
  return Pipeline.from_pretrained(trained)


@pytest.mark.parametrize("kwargs, needle", [
    ({"num_steps": 0}, "num_steps=0: must be a whole number of at least 1"),
    ({"num_steps": 2.5}, "num_steps=2.5"),
    ({"guidance": float("nan")}, "guidance=nan: must be a finite number"),
    ({"guidance": float("inf")}, "guidance=inf"),
    ({"height": 0}, "height=0"),
    ({"width": -32}, "width=-32"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"height": 24, "width": 24}, "trained at 32 x 32"),
])
def test_the_python_api_validates_like_the_cli(pipe, kwargs, needle):
  with pytest.raises(ValueError, match="Fix:") as e:
    pipe(["a red circle"], **kwargs)
  assert needle in str(e.value)


def test_workdir_problems_are_named_with_a_fix(tmp_path, monkeypatch):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(outputs.UserError, match="is a file, not a directory. Fix:"):
    train.train_and_evaluate(tiny_config(), str(a_file))
  with pytest.raises(outputs.OutputError, match="a part of that path is a file"):
    train.train_and_evaluate(tiny_config(), str(a_file / "w"))
  foreign = tmp_path / "llm"
  foreign.mkdir()
  (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(outputs.UserError, match="not a training run's .config.json"):
    train.train_and_evaluate(tiny_config(), str(foreign))
  assert json.loads((foreign / "config.json").read_text()) == {"model_type": "llama"}  # untouched
  real_open = os.open

  def read_only(path, *args, **kwargs):
    if str(path).endswith(lock.NAME):
      raise OSError(errno.EROFS, "Read-only file system", path)
    return real_open(path, *args, **kwargs)
  monkeypatch.setattr(lock.os, "open", read_only)
  with pytest.raises(outputs.OutputError, match=r"cannot write in .*w2: it is on a read-only filesystem. Fix:"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "w2"))
