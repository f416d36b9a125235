"""Prepared datasets: `prepare` from folders and WebDataset tars, the grain pipeline (buckets, resume,
per-process shards, read-time skips) and training from a prepared dataset."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, tiny_config, train_preempted
import image_folder
from lidit_jax.cli import UserError
from lidit_jax.data import images, pipeline, prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The test folder prepared by the CLI (as a user runs it): (data_dir, summary, expected)."""
  root = tmp_path_factory.mktemp("data")
  expected = image_folder.write_folder(str(root / "src"))
  out = subprocess.run([sys.executable, "-m", "lidit_jax.data.prepare", "--src", str(root / "src"), "--out",
                        str(root / "tfds"), "--name", "mixed", "--shard_size", "8", "--workers", "2"],
                       capture_output=True, text=True, cwd=ROOT, check=True)
  summary = json.loads(out.stdout.strip().splitlines()[-1])  # the last line is the JSON summary
  return str(root / "tfds"), summary, expected, str(root / "src")


def tfds_config(data_dir, **overrides):
  return tiny_config(**{"data.source": "tfds", "data.name": "mixed", "data.data_dir": data_dir, **overrides})


def test_prepare_keeps_good_files_and_counts_skips(prepared):
  data_dir, summary, expected, _ = prepared
  assert summary["examples"] == expected["good"]
  assert summary["skipped"] == expected["skipped"]
  assert set(expected["converted"]) <= set(summary["converted"])
  assert summary["shards"] == -(-expected["good"] // 8)

  source, sizes, path = pipeline.open_dataset(data_dir, "mixed")
  assert len(source) == expected["good"] == len(sizes)
  keys = [source[i]["key"].decode() for i in range(len(source))]
  assert keys == sorted(keys) and len(set(keys)) == len(keys)  # stable, ordered keys
  assert not any(k.startswith("broken/") for k in keys)
  by_key = {k: i for i, k in enumerate(keys)}
  for key, size in (("photos/chelsea", (300, 451)), ("photos/camera_grey", (512, 512)), ("photos/dancer_animated", (200, 112))):
    rec = source[by_key[key]]
    img = images.open_image(rec["image"])
    assert img.mode == "RGB" and (img.height, img.width) == size == tuple(rec["size"]) == tuple(sizes[by_key[key]])
  # Several captions survive; a plain RGB JPEG is stored byte for byte.
  assert len(source[by_key["shapes/0000"]]["captions"]) == 2
  raw = open(os.path.join(prepared[3], "photos", "rocket.jpg"), "rb").read()
  assert source[by_key["photos/rocket"]]["image"] == raw
  # 16-bit: scaled to 8 bits, not clipped to white.
  moon = np.asarray(images.open_image(source[by_key["photos/moon_16bit"]]["image"]))
  ref = np.asarray(image_folder.skimage_image("moon.png"))
  assert np.abs(moon[..., 0].astype(int) - ref).max() <= 1
  # RGBA composited on white: the horse's transparent background is white.
  horse = np.asarray(images.open_image(source[by_key["photos/horse_rgba"]]["image"]))
  assert (horse[0, 0] == 255).all()


def test_prepare_webdataset_tar_and_errors(prepared, tmp_path):
  _, _, _, src = prepared
  image_folder.write_tar(src, str(tmp_path / "part0.tar"))
  s = prepare.prepare(str(tmp_path / "*.tar"), str(tmp_path / "out"), "wds", shard_size=4, workers=1, progress=False)
  photos = len(image_folder.PHOTOS) + len(image_folder.ODD)
  assert s["examples"] == photos and s["skipped"] == {}
  source, _, _ = pipeline.open_dataset(str(tmp_path / "out"), "wds")
  assert all(source[i]["key"].decode().startswith("part0/") for i in range(len(source)))

  with pytest.raises(FileExistsError, match="--overwrite"):
    prepare.prepare(str(tmp_path / "*.tar"), str(tmp_path / "out"), "wds", workers=1, progress=False)
  with pytest.raises(ValueError, match="snake_case"):
    prepare.prepare(str(tmp_path / "*.tar"), str(tmp_path / "out"), "Bad-Name", workers=1, progress=False)
  with open(tmp_path / "broken.tar", "wb") as f:  # a cut download
    f.write(open(tmp_path / "part0.tar", "rb").read()[:5000])
  with pytest.raises(UserError, match="broken.tar"):
    prepare.prepare(str(tmp_path / "broken.tar"), str(tmp_path / "out2"), "cut", workers=1, progress=False)
  assert not os.path.exists(tmp_path / "out2" / "cut" / "1.0.0")  # nothing half-written is left


def test_missing_or_corrupt_dataset_is_a_clear_error(prepared, tmp_path):
  import shutil
  with pytest.raises(FileNotFoundError, match="lidit_jax.data.prepare"):
    pipeline.open_dataset(str(tmp_path), "nothing_here")
  shutil.copytree(os.path.join(prepared[0], "mixed"), tmp_path / "mixed")
  shard = sorted((tmp_path / "mixed" / "1.0.0").glob("mixed-train.array_record-00001-*"))[0]
  shard.write_bytes(shard.read_bytes()[:300])
  with pytest.raises(UserError, match=shard.name):
    pipeline.open_dataset(str(tmp_path), "mixed")


def _tokens(captions):
  return {"n": np.array([len(c) for c in captions])}


def test_buckets_static_shapes(prepared):
  c = tfds_config(prepared[0], **{"data.buckets": True, "train.batch_size": 4})
  d = pipeline.TfdsBatches(c, _tokens)
  allowed = images.bucket_shapes(32, c.data.aspect_ratios, c.model.patch_size)
  assert len(d.shapes) >= 2 and set(d.shapes) <= set(allowed)
  assert sum(d.bucket_sizes.values()) == prepared[1]["examples"]
  seen = set()
  for _ in range(12):
    b = next(d)
    assert b["image"].dtype == np.uint8 and b["image"].shape[0] == 4
    seen.add(b["image"].shape[1:3])
    assert len(b["caption"]) == 4 and b["text"]["n"].shape == (4,)
  assert seen == set(d.shapes)  # every bucket is used, nothing else appears

  # Each record went to the bucket nearest its aspect ratio (unless that bucket was merged away).
  sizes = pipeline.open_dataset(prepared[0], "mixed")[1]
  wide = [h / w for h, w in d.shapes if w > h]
  assert wide and all(h < w for h, w in sizes[[i for i in range(len(sizes)) if sizes[i][1] > 1.3 * sizes[i][0]]])


def test_buckets_merge_when_too_small():
  sizes = np.array([[100, 100]] * 10 + [[100, 200]] * 3 + [[200, 100]] * 1)
  shapes = [(32, 32), (22, 46), (46, 22)]
  assign, kept = pipeline.assign_buckets(sizes, shapes, global_batch=2, ranges=[(0, 7), (7, 14)])
  # The tall bucket has 1 example (< batch) and the wide one none in process 0's range: both merge into square.
  assert kept == [(32, 32)] and (assign == 0).all()
  assign, kept = pipeline.assign_buckets(sizes, shapes, global_batch=2, ranges=[(0, 14)])
  assert kept == [(32, 32), (22, 46)] and list(assign[10:13]) == [1, 1, 1] and assign[13] == 0


def test_restore_gives_the_same_batches(prepared):
  c = tfds_config(prepared[0], **{"data.buckets": True, "train.batch_size": 4})
  whole = pipeline.TfdsBatches(c, _tokens)
  ref = [next(whole) for _ in range(7)]
  first = pipeline.TfdsBatches(c, _tokens)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.state()))  # as it goes through the checkpoint
  resumed = pipeline.TfdsBatches(c, _tokens)
  resumed.restore(state)
  for r in ref[3:]:
    b = next(resumed)
    np.testing.assert_array_equal(b["image"], r["image"])
    assert b["caption"] == r["caption"] and list(b["index"]) == list(r["index"])
  # A different seed is a different order (the comparison above can fail).
  other = pipeline.TfdsBatches(tfds_config(prepared[0], **{"data.buckets": True, "train.batch_size": 4, "seed": 1}), _tokens)
  assert any(list(next(other)["index"]) != list(r["index"]) for r in ref[:3])


def test_processes_read_disjoint_shards_that_cover_the_data(prepared):
  c = tfds_config(prepared[0], **{"train.batch_size": 4})
  n = prepared[1]["examples"]
  seen = []
  for p in range(2):
    d = pipeline.TfdsBatches(c, _tokens, process_index=p, process_count=2)
    assert d.local_batch == 2
    per = n // 2
    first_epoch = np.concatenate([d.raw()["index"] for _ in range(-(-per // 2))])[:per]
    np.testing.assert_array_equal(np.sort(first_epoch), np.arange(p * per, (p + 1) * per))
    seen.append(set(first_epoch.tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(2 * (n // 2)))


def test_read_time_failures_are_skipped_and_counted(prepared):
  source, sizes, _ = pipeline.open_dataset(prepared[0], "mixed")
  records = [source[i] for i in range(len(source))]
  records[3] = dict(records[3], image=b"not an image")
  records[5] = dict(records[5], captions=[b"  "])
  c = tfds_config(prepared[0], **{"train.batch_size": 8})
  d = pipeline.TfdsBatches(c, _tokens, source=records, sizes=sizes)
  indices = np.concatenate([d.raw()["index"] for _ in range(8)])
  assert 3 not in indices and 5 not in indices  # replaced, the batch stays full
  counts = d.counters()
  assert counts["data_skipped_unreadable"] >= 1 and counts["data_skipped_empty_caption"] >= 1
  assert d.state()["skipped"]["unreadable"] == counts["data_skipped_unreadable"]


def test_worker_processes_give_the_same_batches(prepared):
  c = tfds_config(prepared[0], **{"data.buckets": True, "train.batch_size": 4})
  threads = pipeline.TfdsBatches(c, _tokens)
  c.data.workers = 2
  procs = pipeline.TfdsBatches(c, _tokens)
  try:
    for _ in range(4):
      a, b = next(threads), next(procs)
      np.testing.assert_array_equal(a["image"], b["image"])
      assert a["caption"] == b["caption"]
  finally:
    procs.close()


def test_decode_crop_centres_and_keeps_aspect():
  img = np.zeros((60, 120, 3), np.uint8)
  img[:, 30:90] = 255  # a white centre square in a wide black image
  from io import BytesIO
  buf = BytesIO()
  Image.fromarray(img).save(buf, "PNG")
  out = images.decode_crop(buf.getvalue(), 30, 30)
  # The centre crop is the white square (bicubic's support reaches one pixel past the crop box).
  assert out.shape == (30, 30, 3) and out[:, 1:-1].min() >= 250 and out.min() > 200
  out = images.decode_crop(buf.getvalue(), 20, 40)
  assert out.shape == (20, 40, 3) and out[:, :5].max() < 10 and out[:, 18:22].min() > 245


def test_train_on_prepared_dataset_and_resume(prepared, tmp_path, monkeypatch):
  """Any config trains on a prepared dataset at its own resolution; a resumed run matches an uninterrupted one."""
  from lidit_jax import train
  config = tfds_config(prepared[0], **{"data.buckets": True, "train.num_steps": 5, "train.batch_size": 4,
                                       "train.log_every": 1, "train.checkpoint_every": 2, "train.sample_every": 100})
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  # Preempted while fetching the 4th batch, after the step-2 checkpoint.
  train_preempted(config, str(tmp_path / "split"), monkeypatch, pipeline.TfdsBatches, at_batch=4)
  read = lambda d: [json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")]
  whole, split = read("whole"), read("split")
  assert [m["step"] for m in split] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([m["loss"] for m in split], [m["loss"] for m in whole], rtol=1e-5)
  assert all(np.isfinite(m["loss"]) and m["data_skipped"] == 0 for m in whole)
  assert len({m["loss"] for m in whole}) == 5  # distinct batches: the comparison can fail


def test_encode_prompts_enumerates_every_caption_of_a_prepared_dataset(prepared):
  from lidit_jax import encode_prompts
  c = tfds_config(prepared[0])
  captions = encode_prompts.run_captions(c)
  source, _, _ = pipeline.open_dataset(prepared[0], "mixed")
  every = {cap.decode() for i in range(len(source)) for cap in source[i]["captions"]}
  assert set(captions) == every | set(c.sample.prompts) and len(captions) == len(set(captions))
  assert any(cap.startswith("synthetic: ") for cap in captions)  # second captions are cached too


def test_latents_dataset_matches_the_images_and_trains(prepared, tmp_path):
  """data.source=features: latents encoded once (pixel space here) equal the image pipeline's crops, and train."""
  from lidit_jax import train
  from lidit_jax.data import latents
  over = {"data.buckets": True, "train.batch_size": 4}
  summary = latents.encode(tfds_config(prepared[0], **over), str(tmp_path), "mixed_latents", batch_size=4,
                           progress=False)
  assert summary["examples"] == prepared[1]["examples"]
  fc = tfds_config(str(tmp_path), **{**over, "data.source": "features", "data.name": "mixed_latents"})
  d = pipeline.TfdsBatches(fc, _tokens)
  lat_source, _, _ = pipeline.open_dataset(str(tmp_path), "mixed_latents")
  img_source, _, _ = pipeline.open_dataset(prepared[0], "mixed")
  by_key = {img_source[i]["key"]: i for i in range(len(img_source))}
  shapes_seen = set()
  for _ in range(6):
    b = next(d)
    assert b["image"].dtype == np.float16
    shapes_seen.add(b["image"].shape[1:3])
    for z, idx, caption in zip(b["image"], b["index"], b["caption"]):
      rec = img_source[by_key[lat_source[int(idx)]["key"]]]
      want = images.decode_crop(rec["image"], *z.shape[:2]).astype(np.float32) / 127.5 - 1.0
      np.testing.assert_allclose(z.astype(np.float32), want, atol=2e-3)
      assert caption in [c.decode() for c in rec["captions"]]
  assert len(shapes_seen) >= 2

  with pytest.raises(ValueError, match="not among this config"):  # encoded for another resolution
    pipeline.TfdsBatches(tfds_config(str(tmp_path), **{**over, "data.source": "features", "data.name": "mixed_latents",
                                                       "data.image_size": 48}), _tokens)
  fc.train.update(num_steps=3, log_every=1, checkpoint_every=3, sample_every=100)
  metrics = train.train_and_evaluate(fc, str(tmp_path / "run"))
  assert np.isfinite(metrics["loss"])


def test_latent_buckets_too_small_are_left_out():
  sizes = np.array([[16, 16]] * 6 + [[12, 20]] * 1)
  assign, kept = pipeline.assign_buckets(sizes, [(16, 16), (12, 20)], global_batch=2, ranges=[(0, 7)],
                                         latents=True)
  assert kept == [(16, 16)] and list(assign) == [0] * 6 + [-1]


def test_dark_16bit_image_keeps_its_brightness():
  """A 16-bit image whose values all lie below 256 is nearly black, not an 8-bit image in disguise."""
  from io import BytesIO
  buf = BytesIO()
  Image.fromarray(np.full((80, 80), 200, np.uint16)).save(buf, "PNG")
  data, size, done = images.normalize(buf.getvalue())
  assert "16bit" in done and size == (80, 80)
  assert np.asarray(images.open_image(data)).max() <= 1  # 200 / 257, not 200
