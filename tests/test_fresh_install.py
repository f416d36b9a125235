"""The README's first command on a fresh machine: the package alone, without the test extra (no torch, no
diffusers, nothing they bring in), installed into a new virtual environment, runs the demo end to end."""
import os
import subprocess
import venv

from conftest import ROOT


def test_bare_install_runs_the_demo_end_to_end(tmp_path):
  env_dir = tmp_path / "venv"
  venv.create(env_dir, with_pip=True)
  python = str(env_dir / "bin" / "python")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS")}
  r = subprocess.run([python, "-m", "pip", "install", "-q", "-e", str(ROOT)], env=env, capture_output=True,
                     text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  # The new environment holds none of what only the test extra brings.
  r = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in ('torch', 'diffusers', 'pytest') "
                      "if u.find_spec(m)])"], env=env, capture_output=True, text=True)
  assert r.stdout.strip() == "[]", r.stdout + r.stderr
  workdir = tmp_path / "run"
  r = subprocess.run([python, "-m", "lidit_jax", "--config", str(ROOT / "configs" / "shapes.py") + ":tiny",
                      "--workdir", str(workdir)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
  assert "[3/3] evaluating" in r.stdout
  assert (workdir / "demo_samples.png").stat().st_size > 0
  assert "colour_accuracy" in (workdir / "eval.json").read_text()
