"""`python -m lidit_jax.benchmark`: the GenEval / T2I-CompBench / DPG-Bench folders, image for image against the
layout rules, resumed after an interruption, and shared by two simulated hosts."""
import json
import os
import pathlib
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from lidit_jax import benchmark, cli
from lidit_jax.pipeline import Pipeline
from lidit_jax.sample import to_uint8

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "configs/shapes.py:tiny")
STEPS = 2
PROMPTS = ["a red circle", "a blue square above a green triangle", "two yellow stars"]


@pytest.fixture(scope="module")
def pipe():
  return Pipeline.from_pretrained(MODEL)


def geneval_file(tmp_path) -> str:
  path = tmp_path / "evaluation_metadata.jsonl"
  lines = [json.dumps({"tag": "single_object", "include": [{"class": "x", "count": 1}], "prompt": p}) for p in PROMPTS]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def t2i_file(tmp_path) -> str:
  path = tmp_path / "color_val.txt"
  path.write_text("\n".join(PROMPTS) + "\n")
  return str(path)


def dpg_folder(tmp_path) -> str:
  folder = tmp_path / "prompts"
  folder.mkdir()
  for i, p in enumerate(PROMPTS):
    (folder / f"item{i}.txt").write_text(p + "\n")
  return str(folder)


def by_hand(pipe, key: str, prompt: str, j: int, seed: int = 0) -> np.ndarray:
  """Image j of a prompt as the module's docstring promises: noise from (seed, the prompt's key, j)."""
  k = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), zlib.crc32(key.encode()) & 0x7FFFFFFF), j)
  return to_uint8(pipe([prompt], num_steps=STEPS, latents=pipe.noise([k])))[0]


def pixels(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


def test_geneval_layout_and_images(tmp_path, pipe):
  prompts = geneval_file(tmp_path)
  out = tmp_path / "geneval"
  result = benchmark.write(pipe, "geneval", prompts, str(out), steps=STEPS, batch_size=5, progress=False)
  assert (result["files"], result["written"], result["skipped"]) == (12, 12, 0)
  assert sorted(os.listdir(out)) == ["00000", "00001", "00002"]
  lines = open(prompts).read().splitlines()
  for i, line in enumerate(lines):
    folder = out / f"{i:05d}"
    assert sorted(os.listdir(folder)) == ["metadata.jsonl", "samples"]
    assert json.loads((folder / "metadata.jsonl").read_text()) == json.loads(line)
    assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png", "0002.png", "0003.png"]
  h, w = pipe.defaults["height"], pipe.defaults["width"]
  assert pixels(out / "00001/samples/0002.png").shape == (h, w, 3)
  # image for image: batches of 5 over 12 images give what one image at a time gives (to a uint8 step)
  got, want = pixels(out / "00001/samples/0002.png"), by_hand(pipe, "00001", PROMPTS[1], 2)
  assert np.abs(got.astype(int) - want).max() <= 1
  assert not np.array_equal(pixels(out / "00001/samples/0002.png"), pixels(out / "00001/samples/0003.png"))
  assert benchmark.images_and_prompts(str(out))[5] == (str(out / "00001/samples/0001.png"), PROMPTS[1])


def test_t2i_compbench_names_and_numbering(tmp_path, pipe):
  out = tmp_path / "t2i"
  benchmark.write(pipe, "t2i_compbench", t2i_file(tmp_path), str(out), num_images=3, steps=STEPS, batch_size=4,
                  progress=False)
  assert sorted(os.listdir(out)) == ["samples"]
  want = sorted(f"{p}_{i * 3 + j:06d}.png" for i, p in enumerate(PROMPTS) for j in range(3))
  assert sorted(os.listdir(out / "samples")) == want
  pairs = benchmark.images_and_prompts(str(out))
  assert sorted(p for _, p in pairs) == sorted(p for p in PROMPTS for _ in range(3))
  bad = tmp_path / "bad_val.txt"
  bad.write_text("a cat / a dog\n")
  with pytest.raises(cli.UserError, match="cannot be a file name"):
    benchmark.write(pipe, "t2i_compbench", str(bad), str(tmp_path / "bad"), steps=STEPS, progress=False)


def test_dpg_bench_grids(tmp_path, pipe):
  out = tmp_path / "dpg"
  benchmark.write(pipe, "dpg_bench", dpg_folder(tmp_path), str(out), steps=STEPS, batch_size=3, progress=False)
  assert sorted(os.listdir(out)) == ["item0.png", "item1.png", "item2.png"]
  h, w = pipe.defaults["height"], pipe.defaults["width"]
  grid = pixels(out / "item1.png")
  assert grid.shape == (2 * h, 2 * w, 3)  # 2 x 2, no gaps: the scorer crops it at --resolution
  cells = benchmark.grid_cells(str(out / "item1.png"))
  assert len(cells) == 4 and np.array_equal(cells[3], grid[h:, w:])
  assert np.abs(cells[2].astype(int) - by_hand(pipe, "item1", PROMPTS[1], 2)).max() <= 1
  pairs = benchmark.images_and_prompts(str(out), str(tmp_path / "prompts"))
  assert pairs == [(str(out / f"item{i}.png"), p) for i, p in enumerate(PROMPTS)]


def test_resume_after_interruption_and_other_settings_refused(tmp_path, pipe, monkeypatch):
  prompts, out = t2i_file(tmp_path), tmp_path / "t2i"
  real, calls = benchmark._write_png, []

  def dies_after_four(path, image, settings):
    if len(calls) == 4:
      raise KeyboardInterrupt  # the run is stopped between two files
    calls.append(path)
    real(path, image, settings)

  monkeypatch.setattr(benchmark, "_write_png", dies_after_four)
  with pytest.raises(KeyboardInterrupt):
    benchmark.write(pipe, "t2i_compbench", prompts, str(out), num_images=2, steps=STEPS, batch_size=2, progress=False)
  monkeypatch.undo()
  first = {p: os.stat(p).st_mtime_ns for p in calls}
  assert sorted(os.listdir(out / "samples")) == sorted(os.path.basename(p) for p in calls)  # no partial file
  result = benchmark.write(pipe, "t2i_compbench", prompts, str(out), num_images=2, steps=STEPS, batch_size=2,
                           progress=False)
  assert (result["skipped"], result["written"], result["images"]) == (4, 2, 2)
  assert all(os.stat(p).st_mtime_ns == t for p, t in first.items())  # finished files left alone
  whole = tmp_path / "whole"
  benchmark.write(pipe, "t2i_compbench", prompts, str(whole), num_images=2, steps=STEPS, batch_size=2, progress=False)
  for name in os.listdir(whole / "samples"):
    assert np.array_equal(pixels(out / "samples" / name), pixels(whole / "samples" / name))
  with pytest.raises(cli.UserError, match="not made with these settings"):
    benchmark.write(pipe, "t2i_compbench", prompts, str(out), num_images=2, steps=STEPS + 1, progress=False)


def test_two_hosts_write_disjoint_shares(tmp_path, pipe, monkeypatch):
  prompts, out = geneval_file(tmp_path), tmp_path / "geneval"
  real, writes = benchmark._write_png, []
  monkeypatch.setattr(benchmark, "_write_png", lambda path, *a: (writes.append(path), real(path, *a)))
  r0 = benchmark.write(pipe, "geneval", prompts, str(out), num_images=3, steps=STEPS, batch_size=4, host=0, hosts=2,
                       progress=False)
  files = [f"{i:05d}/samples/{j:04d}.png" for i in range(3) for j in range(3)]
  assert sorted(writes) == sorted(str(out / f) for f in files[0::2]) and r0["written"] == 5
  r1 = benchmark.write(pipe, "geneval", prompts, str(out), num_images=3, steps=STEPS, batch_size=4, host=1, hosts=2,
                       progress=False)
  assert (r1["skipped"], r1["written"]) == (5, 4)
  assert sorted(writes) == sorted(str(out / f) for f in files)  # every file once
  assert all((out / f"{i:05d}/metadata.jsonl").exists() for i in range(3))


def test_cli(tmp_path, capsys):
  out = tmp_path / "cli"
  assert benchmark.main(["dpg_bench", "--prompts", dpg_folder(tmp_path), "--model", MODEL, "--out", str(out),
                         "--steps", "1", "--num_images", "2"]) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert line["written"] == 3 and pixels(out / "item0.png").shape[1] == 2 * pixels(out / "item0.png").shape[0]
  with pytest.raises(SystemExit) as e:
    benchmark.main(["geneval", "--prompts", str(tmp_path / "missing.jsonl"), "--model", MODEL, "--out", str(out)])
  assert e.value.code == 2 and "no such file" in capsys.readouterr().err


def test_a_diffusers_pipeline_folder_as_model(tmp_path, capsys):
  """--model a diffusers SD folder (the test suite's tiny SD 1.5): its size, and its images as Pipeline draws them."""
  pytest.importorskip("diffusers")
  from test_pipeline import sd15
  folder = str(tmp_path / "sd15")
  sd15(folder)
  out = tmp_path / "t2i"
  prompts = tmp_path / "p_val.txt"
  prompts.write_text("a red cube\n")
  assert benchmark.main(["t2i_compbench", "--prompts", str(prompts), "--model", folder, "--out", str(out),
                         "--num_images", "2", "--steps", "2"]) == 0
  sd = Pipeline.from_pretrained(folder)
  got = pixels(out / "samples" / "a red cube_000001.png")
  assert got.shape == (sd.defaults["height"], sd.defaults["width"], 3)
  k = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), zlib.crc32(b"0") & 0x7FFFFFFF), 1)
  want = to_uint8(sd(["a red cube"], num_steps=2, latents=sd.noise([k])))[0]
  assert np.abs(got.astype(int) - want).max() <= 1
