"""launch/ scripts: --dry-run prints the commands they would run (no gcloud or SLURM here)."""
import subprocess

from conftest import ROOT


def launch(script, *args):
  return subprocess.run(["bash", str(ROOT / "launch" / script), "--dry-run", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=60)


def test_tpu_vm_commands():
  base = ["--name", "lidit", "--zone", "us-east5-a"]
  r = launch("tpu_vm.sh", "create", *base, "--type", "v5p-128", "--spot")
  assert r.returncode == 0, r.stderr
  check, create = r.stdout.strip().splitlines()  # the fit check first: fail before paying for the slice
  assert check.split() == ["python", "-m", "lidit_jax.plan", "--config", "configs/lidit_1b.py", "--topology",
                           "v5p-128", "--require_fit"]
  assert create.split() == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lidit", "--zone", "us-east5-a",
                            "--accelerator-type", "v5p-128", "--version", "v2-alpha-tpuv5", "--spot"]
  r = launch("tpu_vm.sh", "create", *base, "--skip-check")
  assert r.returncode == 0 and "lidit_jax.plan" not in r.stdout, r.stderr
  r = launch("tpu_vm.sh", "train", *base, "--workdir", "gs://b/run", "--", "--config.mesh.fsdp=-1", "--debug")
  assert r.returncode == 0, r.stderr
  check, train = r.stdout.strip().splitlines()
  assert check.split()[-2:] == ["--require_fit", "--config.mesh.fsdp=-1"]  # the config's overrides, not --debug
  assert "--worker=all" in train and "lidit_jax.train" in train and "fsdp=-1" in train
  r = launch("tpu_vm.sh", "install", *base)
  assert "archive" in r.stdout and "--worker=all" in r.stdout and "lidit_jax\\[tpu\\]" in r.stdout
  assert "pkill -TERM" in launch("tpu_vm.sh", "stop", *base).stdout.replace("\\ ", " ")
  r = launch("tpu_vm.sh", "train", *base)
  assert r.returncode == 2 and "--workdir is required" in r.stderr


def test_gpu_commands():
  r = launch("gpu.sh", "slurm", "--nodes", "4", "--config", "configs/lidit_1b.py", "--workdir", "/shared/x")
  assert r.returncode == 0, r.stderr
  assert "#SBATCH --nodes=4" in r.stdout and "#SBATCH --signal=TERM@300" in r.stdout
  assert "srun --kill-on-bad-exit=1 python -m lidit_jax.train --config configs/lidit_1b.py" in r.stdout
  r = launch("gpu.sh", "local", "--config", "configs/shapes.py", "--workdir", "runs/x")
  assert r.stdout.split() == ["python", "-m", "lidit_jax.train", "--config", "configs/shapes.py", "--workdir",
                              "runs/x"]
  assert launch("gpu.sh", "slurm").returncode == 2
  r = launch("gpu.sh", "slurm", "--nodes", "2", "--card", "h100", "--config", "configs/lidit_1b.py", "--workdir",
             "/shared/x", "--", "--config.train.batch_size=512")
  assert ("python -m lidit_jax.plan --config configs/lidit_1b.py --topology h100:2x8 --require_fit "
          "--config.train.batch_size=512") in r.stdout and "#SBATCH --nodes=2" in r.stdout
