"""Sizes checked before reading (tar members, files, declared pixels), and the outputs of sample, evaluate,
encode_prompts and the dataset builders: written whole, replacing only their own, refused by name otherwise."""
import errno
import io
import json
import os
import subprocess
import tarfile
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import ROOT, tiny_config
from lidit_jax import evaluate, outputs, sample, text_cache
from lidit_jax.data import images, latents, pipeline, prepare
from test_faults import assert_user_error, mount_tmpfs, run_cli

TINY = str(ROOT / "configs/shapes.py:tiny")
DECLARED = 3 * 2 ** 29  # 1.5 GiB: what the sparse member declared


def png_bytes(size=(64, 64), seed=0, mode="RGB") -> bytes:
  rng = np.random.default_rng(seed)
  shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, "PNG")
  return buf.getvalue()


def write_pair(folder, stem, image: bytes | None, caption="a picture"):
  if image is not None:
    (folder / f"{stem}.png").write_bytes(image)
  (folder / f"{stem}.txt").write_text(caption)


def sparse_file(path, size: int, head: bytes = b"\x89PNG\r\n\x1a\n"):
  """A file that declares `size` bytes and stores about one block (a hole after `head`)."""
  with open(path, "wb") as f:
    f.write(head)
    f.truncate(size)
  assert os.stat(path).st_blocks * 512 < 2 ** 20, "the filesystem did not keep the file sparse"


def peak_bytes(fn):
  """fn()'s result and the most memory Python allocated while it ran (every thread)."""
  tracemalloc.start()
  try:
    return fn(), tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


# ------------------------------------------------------------------------------------------------
# Sizes before reading
# ------------------------------------------------------------------------------------------------
def test_a_sparse_tar_member_is_skipped_by_its_declared_size_never_read(tmp_path, monkeypatch):
  """The issue's probe: a 10 KiB tar whose GNU sparse member declares 1.5 GiB. It is counted `too_large` from its
  header, extractfile never opens it, the good members around it are written, and memory stays small (before: the
  whole member was expanded, 1.6 GB)."""
  src = tmp_path / "src"
  src.mkdir()
  write_pair(src, "a", png_bytes(seed=1))
  sparse_file(src / "big.png", DECLARED)
  write_pair(src, "big", None, "a big one")
  write_pair(src, "c", png_bytes(seed=2))
  tar = tmp_path / "shard.tar"
  subprocess.run(["tar", "--sparse", "-cf", str(tar), "-C", str(src), "a.png", "a.txt", "big.png", "big.txt",
                  "c.png", "c.txt"], check=True)
  assert tar.stat().st_size < 64 * 2 ** 10
  with tarfile.open(tar) as t:
    assert t.getmember("big.png").issparse() and t.getmember("big.png").size == DECLARED
  opened, real = [], tarfile.TarFile.extractfile
  monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: opened.append(m.name) or real(self, m))
  run = lambda: prepare.prepare(str(tar), str(tmp_path / "out"), "wds", workers=2, progress=False)
  summary, peak = peak_bytes(run)  # two workers: the skip crosses a process boundary (pickled)
  assert summary["examples"] == 2 and summary["skipped"] == {"too_large": 1}
  assert "big.png" in summary["skip_examples"]["too_large"] and "--max_bytes" in summary["skip_examples"]["too_large"]
  assert "big.png" not in opened and {"a.png", "c.png", "big.txt"} <= set(opened)
  assert peak < 64 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB: the declared bytes were read"
  source, _, _ = pipeline.open_dataset(str(tmp_path / "out"), "wds")
  assert sorted(source[i]["key"].decode() for i in range(len(source))) == ["shard/a", "shard/c"]


def test_folder_files_over_the_byte_limit_are_skipped_unread(tmp_path):
  """A folder image over the limit (default 256 MiB; a sparse 300 MiB file) is counted `too_large` by its size
  alone: memory stays small. With --max_pixels the limit is derived from it; --max_bytes sets it."""
  src = tmp_path / "src"
  src.mkdir()
  write_pair(src, "good", png_bytes())
  sparse_file(src / "huge.png", 300 * 2 ** 20)
  write_pair(src, "huge", None)
  summary, peak = peak_bytes(lambda: prepare.prepare(str(src), str(tmp_path / "out"), "pics", workers=1,
                                                     progress=False))
  assert summary["examples"] == 1 and summary["skipped"] == {"too_large": 1}, summary
  assert peak < 64 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB: the file was read"
  assert prepare.byte_limit() == 256 * 2 ** 20
  assert prepare.byte_limit(max_pixels=10 ** 6) == 8 * 10 ** 6 + 2 ** 20
  assert prepare.byte_limit(max_pixels=10 ** 6, max_bytes=1000) == 1000
  with pytest.raises(ValueError, match="max_bytes=-1"):
    prepare.byte_limit(max_bytes=-1)
  # A limit below the good file's size skips it too, and names the flag.
  good = len(png_bytes())
  item = ("good", str(src / "good.png"), [("txt", str(src / "good.txt"))], False)
  assert prepare.process(item, 64, 0, good)[0] == "ok"
  skip = prepare.process(item, 64, 0, good - 1)
  assert skip[:3] == ("skip", "good", "too_large") and "--max_bytes" in skip[3]


def test_declared_pixels_are_checked_before_decoding(monkeypatch):
  """An image whose header declares more than --max_pixels (or less than --min_size) is skipped without being
  decoded; Pillow's own decompression-bomb limit still holds."""
  decoded, real = [], ImageFile.ImageFile.load
  monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real(self))
  big = png_bytes((1200, 1000), mode="L")
  with pytest.raises(images.Skip, match="1200x1000 has more than --max_pixels=1000000") as e:
    images.normalize(big, max_pixels=10 ** 6)
  assert e.value.reason == "too_large" and decoded == []
  with pytest.raises(images.Skip, match="too_small"):
    images.normalize(big, min_size=2000)
  assert decoded == []
  _, size, _ = images.normalize(big, max_pixels=2 * 10 ** 6)  # within the limit: decoded as before
  assert size == (1000, 1200) and set(decoded) == {(1200, 1000)}
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  with pytest.raises(images.Skip, match="decompression bomb") as e:
    images.normalize(big)
  assert e.value.reason == "too_large"


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------
def test_datasets_are_refused_before_reading_and_replaced_whole(tmp_path, monkeypatch):
  """An existing dataset is refused before any input is read (latents: before its source is even opened);
  --overwrite replaces it only once the new one is complete: a full disk or a run that keeps nothing leaves the
  previous one as it was, and no temporary directory."""
  src = tmp_path / "src"
  src.mkdir()
  write_pair(src, "a", png_bytes())
  out = tmp_path / "out"
  first = prepare.prepare(str(src), str(out), "pics", workers=1, progress=False)
  final = out / "pics" / prepare.VERSION
  before = sorted(os.listdir(final))
  with pytest.raises(FileExistsError, match="--overwrite"):
    prepare.prepare(str(tmp_path / "nothing_here"), str(out), "pics", workers=1, progress=False)
  with pytest.raises(FileExistsError, match="--overwrite"):
    latents.encode(tiny_config(**{"data.source": "tfds", "data.name": "absent", "data.data_dir": str(tmp_path)}),
                   str(out), "pics", progress=False)

  def full_disk(self, record):
    raise OSError(errno.ENOSPC, "No space left on device")
  with monkeypatch.context() as m:
    m.setattr(prepare.ShardWriter, "write", full_disk)
    with pytest.raises(outputs.OutputError, match=f"disk holding {out / 'pics'} is full"):
      prepare.prepare(str(src), str(out), "pics", workers=1, overwrite=True, progress=False)
  (src / "a.txt").write_text("  ")  # every example skipped: nothing to write
  with pytest.raises(prepare.UserError, match="no examples written"):
    prepare.prepare(str(src), str(out), "pics", workers=1, overwrite=True, progress=False)
  assert sorted(os.listdir(final)) == before and os.listdir(out / "pics") == [prepare.VERSION]
  assert json.loads((final / prepare.STATS_FILE).read_text())["examples"] == first["examples"]
  (src / "a.txt").write_text("a new caption")
  prepare.prepare(str(src), str(out), "pics", workers=1, overwrite=True, progress=False)
  source, _, _ = pipeline.open_dataset(str(out), "pics")
  assert source[0]["captions"] == [b"a new caption"] and os.listdir(out / "pics") == [prepare.VERSION]
  (tmp_path / "file").write_text("not a folder")
  with pytest.raises(outputs.OutputError, match=f"{tmp_path / 'file'}.*Fix:"):
    prepare.prepare(str(src), str(tmp_path / "file"), "pics", workers=1, progress=False)


# ------------------------------------------------------------------------------------------------
# Sample images and the evaluator's files
# ------------------------------------------------------------------------------------------------
def test_sample_pngs_replace_their_own_and_refuse_a_users_file(tmp_path):
  grid = np.zeros((2, 4, 4, 3), np.uint8)
  ours = tmp_path / "s.png"
  sample.save_grid(grid, str(ours), overwrite=False)
  assert sample.is_ours(str(ours))
  sample.save_grid(grid + 200, str(ours), overwrite=False)  # the same command again: replaced
  assert np.asarray(Image.open(ours)).min() == 200
  photo = tmp_path / "photo.png"
  Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(photo)
  kept = photo.read_bytes()
  assert not sample.is_ours(str(photo))
  with pytest.raises(outputs.OutputError, match=f"{photo} already exists.*--overwrite"):
    sample.save_grid(grid, str(photo), overwrite=False)
  assert photo.read_bytes() == kept
  sample.save_grid(grid, str(photo), overwrite=True)
  assert sample.is_ours(str(photo))
  sample.save_grid(grid, str(photo))  # the trainer's call: its samples/ are its own
  assert sorted(os.listdir(tmp_path)) == ["photo.png", "s.png"]  # no temporary file left


def test_sample_cli_refuses_outputs_before_sampling(tmp_path):
  """`sample --out` under a file, onto a user's PNG, or in a read-only directory: exit 2, one line naming the
  path and the fix, before any model is built."""
  (tmp_path / "notes.txt").write_text("a file")
  (tmp_path / "photo.png").write_bytes(png_bytes((8, 8)))
  cli = lambda out, *more: run_cli("lidit_jax.sample", "--config", TINY, "--prompt", "a red circle", "--out", out,
                                   *more)
  assert_user_error(cli(str(tmp_path / "notes.txt" / "x.png")), str(tmp_path / "notes.txt"), "not a directory",
                    "Fix:")
  assert_user_error(cli(str(tmp_path / "notes.txt" / "sub" / "x.png")), str(tmp_path / "notes.txt"), "Fix:")
  assert_user_error(cli(str(tmp_path / "photo.png")), str(tmp_path / "photo.png"), "--overwrite")
  assert (tmp_path / "photo.png").read_bytes() == png_bytes((8, 8))
  readonly = tmp_path / "ro"
  mount_tmpfs(readonly, "1m,ro")
  try:
    assert_user_error(cli(str(readonly / "x.png")), str(readonly), "read-only", "Fix:")
  finally:
    subprocess.run(["umount", str(readonly)])


@pytest.mark.slow
def test_sample_cli_rewrites_its_own_png(tmp_path):
  """Running a sample command again replaces the PNG the last one wrote (recognised by its text chunk)."""
  out = tmp_path / "samples"
  previous = out / "000_a_red_circle.png"
  sample.save_grid(np.zeros((1, 8, 8, 3), np.uint8), str(previous), scale=1)
  r = run_cli("lidit_jax.sample", "--config", TINY, "--prompt", "a red circle", "--steps", "1", "--out", str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  img = Image.open(previous)
  assert img.size != (12, 12) and img.info["Software"] == "lidit_jax" and os.listdir(out) == [previous.name]


def test_evaluate_outputs_replace_their_own_and_refuse_others(tmp_path):
  out = tmp_path / "eval.json"
  paths = (out, tmp_path / evaluate.GRID, tmp_path / evaluate.GRID_LIST)
  evaluate.check_outputs(str(out), overwrite=False)  # nothing there yet
  evaluate.write_text(str(out), json.dumps({"prompt_accuracy": 0.5, "split": "heldout", "checkpoint_step": 3}),
                      False, evaluate.is_result, "an evaluation result")
  sample.save_grid(np.zeros((1, 4, 4, 3), np.uint8), str(paths[1]))
  evaluate.write_text(str(paths[2]), "00 OK  a red circle\n01 BAD a blue square\n", False, evaluate.is_grid_list,
                      "an evaluation's grid captions")
  evaluate.check_outputs(str(out), overwrite=False)  # a previous evaluation's files: replaced
  for path, foreign in zip(paths, (b'{"mine": 1}', png_bytes((8, 8)), b"my notes\n")):
    kept = path.read_bytes()
    path.write_bytes(foreign)
    with pytest.raises(outputs.OutputError, match=f"{path} already exists.*--overwrite"):
      evaluate.check_outputs(str(out), overwrite=False)
    evaluate.check_outputs(str(out), overwrite=True)
    path.write_bytes(kept)
  r = run_cli("lidit_jax.evaluate", "--workdir", str(tmp_path / "empty"), "--out", str(tmp_path / "notes" / "e.json"))
  assert_user_error(r, str(tmp_path / "empty"), "is neither")  # no output problem: on to the workdir
  (tmp_path / "e.json").write_text('{"mine": 1}')
  assert_user_error(run_cli("lidit_jax.evaluate", "--workdir", str(tmp_path / "empty"), "--out",
                            str(tmp_path / "e.json")), str(tmp_path / "e.json"), "--overwrite")


# ------------------------------------------------------------------------------------------------
# Text caches
# ------------------------------------------------------------------------------------------------
def test_text_cache_is_written_whole_and_replaces_only_when_asked(tmp_path):
  from lidit_jax import model as model_lib
  config = tiny_config()
  towers = model_lib.build_towers(config)
  params = model_lib.load_tower_params(config, towers)
  out = tmp_path / "cache"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  write = lambda captions, **kw: text_cache.write(str(out), config, towers, params, captions, batch_size=2,
                                                  progress=False, **kw)
  with pytest.raises(outputs.OutputError, match=f"{out} already exists and is not a text cache.*--overwrite"):
    write(["a red circle"])
  assert os.listdir(out) == ["notes.txt"]
  write(["a red circle"], overwrite=True)
  assert sorted(os.listdir(out)) == ["captions.json", "features.safetensors", text_cache.META]
  with pytest.raises(FileExistsError, match=f"{out} already holds a text cache.*--overwrite"):
    text_cache.check_out(str(out))
  write(["a blue square", "a green star"], overwrite=True)
  assert text_cache.TextCache(str(out), config, towers).index == {"a blue square": 0, "a green star": 1}
  assert sorted(os.listdir(tmp_path)) == ["cache"]  # no temporary or old copy left beside it
  r = run_cli("lidit_jax.encode_prompts", "--config", TINY, "--out", str(out))
  assert_user_error(r, str(out), "already holds a text cache", "--overwrite")
