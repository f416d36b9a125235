"""Exports and conversions (issue 32): written under a temporary name and renamed when complete; an existing OUT
replaced only when the same command wrote it (or with --overwrite); the source and a held workdir refused; a full
disk, a read-only directory or a bad input is one message naming what is wrong and the fix."""
import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from safetensors import SafetensorError

from lidit_jax import export, lock, outputs
from lidit_jax.convert import diffusers_unet, load_hf_text_model, orbax_io, registry, safetensors_io, tiny_models
from lidit_jax.convert.__main__ import main as convert
from lidit_jax.pipeline import Pipeline

from conftest import ROOT
from test_faults import mount_tmpfs
from test_pipeline import sd15

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  """A tiny SD 1.x-style diffusers pipeline folder."""
  path = tmp_path_factory.mktemp("pipe") / "sd15"
  sd15(path)
  return path


@pytest.fixture(scope="module")
def sd(pipe):
  return Pipeline.from_pretrained(str(pipe)).backend


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return tiny_models.write_tiny_model(str(tmp_path_factory.mktemp("hf") / "llama"), "llama")


@pytest.fixture
def small_disk(tmp_path):
  """A 64 KiB tmpfs, smaller than any tiny model here (root only: skipped elsewhere; the patched writers still run)."""
  disk = tmp_path / "disk"
  mount_tmpfs(disk, "64k")
  yield disk
  subprocess.run(["umount", str(disk)])


def refused(capsys, main, *args) -> str:
  """The one `error:` line of a command that must exit 2 without a traceback."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    main([str(a) for a in args])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err, err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, err
  return errors[0]


def leftovers(directory) -> list[str]:
  """Temporary or moved-aside outputs (`.NAME.tmp-PID`, `.NAME.old-PID`) left in `directory`."""
  return [n for n in os.listdir(directory) if n.startswith(".") and (".tmp-" in n or ".old-" in n)]


def snapshot(directory) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), directory)] = fh.read()
  return out


def fail_save_file(monkeypatch, at_call: int, why: str):
  """safetensors' save_file writes half a file and fails with `why` (its own error text) at its `at_call`-th call."""
  real, calls = safetensors.numpy.save_file, {"n": 0}

  def save_file(tensors, filename, metadata=None):
    calls["n"] += 1
    if calls["n"] == at_call:
      with open(filename, "wb") as f:
        f.write(b"\0" * 1000)
      raise SafetensorError(f"Error while serializing: I/O error: {why}")
    return real(tensors, filename, metadata=metadata)
  monkeypatch.setattr(safetensors.numpy, "save_file", save_file)


# ---------------------------------------------------------------------------------------------------------- export

def test_export_diffusers_replaces_only_its_own_output(pipe, sd, tmp_path, capsys):
  """A folder the export did not write is refused by name (it used to overwrite OUT/unet/* with exit 0), a
  downloaded pipeline folder too; its own previous output is replaced whole; --overwrite replaces anything."""
  out = tmp_path / "out"
  (out / "unet").mkdir(parents=True)
  (out / "unet" / "diffusion_pytorch_model.safetensors").write_text("the user's file")
  error = refused(capsys, export.main, "diffusers", pipe, out)
  assert str(out) in error and "--overwrite" in error
  assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_text() == "the user's file"
  downloaded = tmp_path / "downloaded"
  shutil.copytree(pipe, downloaded)
  assert "--overwrite" in refused(capsys, export.main, "diffusers", pipe, downloaded)
  assert "is the source" in refused(capsys, export.main, "diffusers", pipe, pipe, "--overwrite")

  new = tmp_path / "new"
  export.export_diffusers(sd, str(new))
  (new / "stray.txt").write_text("not part of an export")
  export.export_diffusers(sd, str(new))  # its own output: replaced whole, not merged
  assert not (new / "stray.txt").exists() and (new / "model_index.json").exists()
  assert export.main(["diffusers", str(pipe), str(out), "--overwrite"]) == 0
  assert snapshot(out).keys() == snapshot(new).keys()
  assert not leftovers(tmp_path)


def test_exported_files_replace_only_files_the_same_command_wrote(sd, pipe, tmp_path, capsys):
  file = tmp_path / "sd.safetensors"
  file.write_bytes(b"a user's file")
  error = refused(capsys, export.main, "diffusers", pipe, file, "--format", "single-file")
  assert str(file) in error and "--overwrite" in error and file.read_bytes() == b"a user's file"
  safetensors.numpy.save_file({"w": np.zeros(2, np.float32)}, str(file))  # someone else's safetensors
  with pytest.raises(outputs.OutputError, match="--overwrite"):
    export.export_single_file(sd, str(file))
  export.export_single_file(sd, str(file), overwrite=True)
  first = os.stat(file).st_ino
  export.export_single_file(sd, str(file))  # its own output: replaced (a new file renamed over it)
  assert safetensors_io.metadata(str(file))["lidit_jax.export"] == "single-file" and os.stat(file).st_ino != first

  # `export safetensors` takes neither a foreign file nor a single-file export; a previous output of its own passes
  # the check (and this empty workdir then fails on its missing checkpoint); the workdir itself is the source
  workdir = tmp_path / "run"
  workdir.mkdir()
  assert "--overwrite" in refused(capsys, export.main, "safetensors", workdir, file)
  previous = tmp_path / "model.safetensors"
  safetensors.numpy.save_file({"w": np.zeros(2, np.float32)}, str(previous), metadata={"lidit_jax.export": "safetensors"})
  assert "no checkpoint in" in refused(capsys, export.main, "safetensors", workdir, previous)
  assert "is the source" in refused(capsys, export.main, "safetensors", workdir, workdir, "--overwrite")
  assert not leftovers(tmp_path)


def test_a_full_disk_during_export_leaves_nothing_half_written(pipe, sd, tmp_path, capsys, monkeypatch):
  """The VAE's weights fail like a full disk after the U-Net's were written: one message naming the directory and
  the bytes; the previous output stays whole, and a new OUT does not appear (it used to be left with unet/ and
  vae/ and no model_index.json)."""
  out = tmp_path / "out"
  export.export_diffusers(sd, str(out))
  before = snapshot(out)
  fail_save_file(monkeypatch, 2, "No space left on device (os error 28)")
  error = refused(capsys, export.main, "diffusers", pipe, out)
  assert f"the disk holding {tmp_path} is full" in error and "needs about" in error and "free" in error
  assert snapshot(out) == before and not leftovers(tmp_path)
  fail_save_file(monkeypatch, 2, "No space left on device (os error 28)")
  with pytest.raises(outputs.OutputError, match="is full"):
    export.export_diffusers(sd, str(tmp_path / "new"))
  assert not (tmp_path / "new").exists() and not leftovers(tmp_path)


def test_export_into_a_read_only_directory_is_one_message(pipe, tmp_path, capsys, monkeypatch):
  """safetensors' own error (no OSError) on a read-only directory used to end in a traceback."""
  fail_save_file(monkeypatch, 1, 'Read-only file system (os error 30) at path "x"')
  error = refused(capsys, export.main, "diffusers", pipe, tmp_path / "sd.safetensors", "--format", "single-file")
  assert f"cannot write in {tmp_path}" in error and "read-only" in error and "Fix:" in error
  assert os.listdir(tmp_path) == []


def test_a_real_full_or_read_only_filesystem(sd, small_disk, monkeypatch):
  """On a real 64 KiB tmpfs: the ~1 MiB export is refused before writing; without that check, the real full disk
  part way is one message; read-only, one message; nothing left on the disk either way."""
  file = str(small_disk / "sd.safetensors")
  with pytest.raises(outputs.OutputError, match=f"not enough space in {small_disk}.*needs about [0-9.]+ MiB"):
    export.export_single_file(sd, file)
  monkeypatch.setattr(outputs, "check_space", lambda *a, **k: None)
  with pytest.raises(outputs.OutputError, match=f"the disk holding {small_disk} is full"):
    export.export_single_file(sd, file)
  assert os.listdir(small_disk) == []
  subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  with pytest.raises(outputs.OutputError, match="read-only filesystem"):
    export.export_diffusers(sd, str(small_disk / "out"))
  assert os.listdir(small_disk) == []


def test_writing_into_a_workdir_a_trainer_holds_is_refused(pipe, llama, tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with lock.held(str(workdir), "train"):
    for main, args in ((export.main, ["safetensors", workdir, workdir / "model.safetensors"]),
                       (export.main, ["diffusers", pipe, workdir, "--overwrite"]),
                       (convert, ["hf-text", llama, workdir / "llm"])):
      error = refused(capsys, main, *args)
      assert f"{workdir} is a workdir held by" in error and f"pid {os.getpid()}" in error
  assert os.listdir(workdir) == []


# --------------------------------------------------------------------------------------------------------- convert

def test_convert_refuses_a_training_workdir_and_replaces_its_own_output(llama, pipe, tmp_path, capsys):
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text('{"model": {"family": "dit"}}')
  error = refused(capsys, convert, "hf-text", llama, workdir)
  assert str(workdir) in error and "--overwrite" in error  # it used to replace the run's config.json
  assert (workdir / "config.json").read_text() == '{"model": {"family": "dit"}}'
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json"]

  out = tmp_path / "out"
  assert convert(["hf-text", llama, str(out), "--dtype", "float32"]) == 0
  (out / "stray.txt").write_text("not part of a conversion")
  assert convert(["hf-text", llama, str(out), "--dtype", "float32"]) == 0  # its own output: replaced whole
  assert not (out / "stray.txt").exists()
  # Orbax's checkpoint reads after its directory was renamed from the temporary name
  jax.tree.map(np.testing.assert_array_equal, load_hf_text_model(llama)[1], load_hf_text_model(str(out))[1])
  assert "--overwrite" in refused(capsys, convert, "vae", pipe, out)  # a text model is no VAE conversion
  assert convert(["hf-text", llama, str(workdir), "--overwrite", "--dtype", "float32"]) == 0
  assert registry.marker(str(workdir)) and not (workdir / "checkpoints").exists()
  assert not leftovers(tmp_path)


def test_convert_into_or_around_its_source_is_refused_before_writing(llama, tmp_path, capsys):
  src = tmp_path / "llm"
  shutil.copytree(llama, src)
  before = snapshot(src)
  for out, flags, why in ((src, [], "is the source"), (src, ["--overwrite"], "is the source"),
                          (src / "converted", [], "lies inside the source"), (tmp_path, ["--overwrite"], "holds the source")):
    error = refused(capsys, convert, "hf-text", src, out, *flags)
    assert why in error and "Fix: choose an output path outside" in error
  assert snapshot(src) == before and os.listdir(tmp_path) == ["llm"]


def test_convert_diffusers_follows_the_same_rule(pipe, tmp_path, capsys):
  """Its "not empty" refusal is now the shared rule: a foreign OUT refused (with --overwrite offered), its own
  previous output (a converted pipeline folder) replaced, an empty directory filled."""
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  error = refused(capsys, convert, "diffusers", pipe, out)
  assert str(out) in error and "--overwrite" in error and os.listdir(out) == ["notes.txt"]
  (out / "notes.txt").unlink()
  assert convert(["diffusers", str(pipe), str(out)]) == 0
  (out / "stray.txt").write_text("not part of a conversion")
  assert convert(["diffusers", str(pipe), str(out)]) == 0
  assert not (out / "stray.txt").exists() and registry.marker(str(out / "unet"))
  assert "is the source" in refused(capsys, convert, "diffusers", pipe, pipe, "--overwrite")
  assert not leftovers(tmp_path)


def test_a_full_disk_during_conversion_leaves_nothing_half_written(pipe, tmp_path, capsys, monkeypatch):
  """Orbax's writer fails like a full disk on the VAE, after the U-Net was written: one message; the previous
  conversion stays whole and still loads, and a new OUT does not appear."""
  out = tmp_path / "out"
  assert convert(["diffusers", str(pipe), str(out)]) == 0
  before = snapshot(out)
  real = orbax_io._HostArrayHandler._open_and_write

  async def write(self, value, tspec, ts_context):
    if f"{os.sep}vae{os.sep}" in json.dumps(tspec if isinstance(tspec, dict) else str(tspec)):
      raise OSError(errno.ENOSPC, "No space left on device")
    await real(self, value, tspec, ts_context)
  monkeypatch.setattr(orbax_io._HostArrayHandler, "_open_and_write", write)
  for target in (out, tmp_path / "new"):
    error = refused(capsys, convert, "diffusers", pipe, target)
    assert f"the disk holding {tmp_path} is full" in error and "needs about" in error
  assert snapshot(out) == before and not (tmp_path / "new").exists() and not leftovers(tmp_path)
  monkeypatch.undo()
  Pipeline.from_pretrained(str(out))


def test_a_real_full_disk_during_conversion_is_one_message(llama, small_disk):
  """Orbax's writer threads hit a real full disk (the space check turned off): one line, none of Orbax's per-thread
  tracebacks, nothing left on the disk."""
  script = ("import sys\nfrom lidit_jax import outputs\noutputs.check_space = lambda *a, **k: None\n"
            "from lidit_jax.convert.__main__ import main\n"
            f"sys.exit(main(['hf-text', {llama!r}, {str(small_disk / 'out')!r}, '--dtype', 'float32']))\n")
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: the disk holding {small_disk} is full"), r.stderr[-3000:]
  assert os.listdir(small_disk) == []


# -------------------------------------------------------------------------------------------------------- messages

def test_a_malicious_pickle_is_refused_as_unsafe(llama, tmp_path, capsys):
  """--allow-pickle loads with torch's weights_only mode, which refuses the payload; now one message, not an
  UnpicklingError traceback, and the payload never ran."""
  class Payload:
    def __reduce__(self):
      return os.mkdir, (str(tmp_path / "pwned"),)
  src = tmp_path / "llm"
  shutil.copytree(llama, src, ignore=shutil.ignore_patterns("*.safetensors"))
  torch.save({"model.embed_tokens.weight": Payload()}, src / "pytorch_model.bin")
  error = refused(capsys, convert, "hf-text", src, tmp_path / "out", "--allow-pickle")
  assert "pytorch_model.bin was refused as unsafe" in error and "posix.mkdir" in error
  assert "Fix: convert it to safetensors with a tool you trust" in error
  assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_unsupported_inputs_are_named_with_the_fix(pipe, llama, tmp_path, capsys):
  ckpt = tmp_path / "model.ckpt"
  ckpt.write_bytes(b"PK\x03\x04 a zipped pickle")
  error = refused(capsys, convert, "single-file", ckpt, tmp_path / "out", "--config", pipe)
  assert f"{ckpt} is a PyTorch pickle checkpoint" in error and "not read" in error and ".safetensors" in error

  vae = tmp_path / "vae"
  shutil.copytree(pipe / "vae", vae)
  (vae / "config.json").write_text('{"_class_name": "AutoencoderKL",')
  error = refused(capsys, convert, "vae", vae, tmp_path / "out")
  assert f"{vae / 'config.json'} is not valid JSON" in error and "Fix:" in error

  gpt2 = tmp_path / "gpt2"
  shutil.copytree(llama, gpt2)
  (gpt2 / "config.json").write_text(json.dumps({**json.loads((gpt2 / "config.json").read_text()), "model_type": "gpt2"}))
  error = refused(capsys, convert, "hf-text", gpt2, tmp_path / "out")
  assert "model_type='gpt2' is not supported" in error and "'llama'" in error and "Fix: convert a model of" in error

  mixed = tmp_path / "mixed"
  shutil.copytree(pipe, mixed)
  config = json.loads((pipe / "unet" / "config.json").read_text())
  (mixed / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": [1, 2]}))
  error = refused(capsys, convert, "diffusers", mixed, tmp_path / "out")
  assert f"{mixed / 'unet' / 'config.json'}: layers_per_block=[1, 2]" in error and "Fix:" in error
  assert not (tmp_path / "out").exists()
  # one count for every block, written as a list, is that count
  as_list = {**config, "layers_per_block": [config["layers_per_block"]] * len(config["block_out_channels"])}
  assert diffusers_unet.config_from_diffusers(as_list) == diffusers_unet.config_from_diffusers(config)
