"""The grain pipeline's throughput on a prepared dataset, against what the train step consumes.

  python -m benchmarks.data_pipeline [--images 240] [--batches 12] [--no-record]

Builds a dataset of JPEG photos (scikit-image's sample photos, cropped to aspect ratios between 1:2 and
2:1 and resized to a shorter side of 512 to 1024 px, the range of web-scale image-text data) with
`prepare`, then times, in one process on the same data:
- *decode, 1 core*: `images.decode_crop` in a plain loop on one thread (the per-image work: JPEG decode
  at reduced DCT scale, centre crop, bicubic resize), images / s;
- the whole pipeline (`TfdsBatches`: shuffle, read, decode, crop, caption choice, batch) with decoding in
  threads (data.workers=0) and in worker processes (data.workers = cores), at 256 and 512 px, square crops
  and aspect-ratio buckets; images / s / core = images / s divided by the cores the process may use.
The consumption side comes from `plan`: images / s / chip that LI-DiT-1B (256 px) and LI-DiT-10B (512 px)
train at on a v5p chip at 40 % MFU, with text features cached (`text.cache`), so no LLM runs in the step.
Prints one JSON line and rewrites its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg")


def write_photos(root: str, n: int, seed: int = 0) -> None:
  import importlib.resources
  rng = np.random.default_rng(seed)
  base = [Image.open(importlib.resources.files("skimage") / "data" / p).convert("RGB") for p in PHOTOS]
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    img = base[i % len(base)]
    ar = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width / height
    w, h = img.size
    cw, ch = (w, int(w / ar)) if w / ar <= h else (int(h * ar), h)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    short = int(rng.uniform(512, 1024))
    scale = short / min(cw, ch)
    out = img.crop((x, y, x + cw, y + ch)).resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
    out.save(os.path.join(root, f"{i:05d}.jpg"), quality=90)
    with open(os.path.join(root, f"{i:05d}.txt"), "w") as f:
      f.write(f"photo {i} of {PHOTOS[i % len(PHOTOS)].split('.')[0]}")


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def decode_rate(source, size: int, n: int) -> float:
  from lidit_jax.data import images
  recs = [source[i]["image"] for i in range(n)]
  t = time.perf_counter()
  for r in recs:
    images.decode_crop(r, size, size)
  return n / (time.perf_counter() - t)


def pipeline_rate(config, batches: int) -> float:
  from lidit_jax.data import pipeline
  d = pipeline.TfdsBatches(config, text_for=lambda captions: {})
  try:
    for _ in range(4):  # start-up (worker processes) and filling the read-ahead buffers
      d.raw()
    t = time.perf_counter()
    for _ in range(batches):
      d.raw()
    return batches * d.local_batch / (time.perf_counter() - t)
  finally:
    d.close()


def consumption(config_path: str, size: int) -> float:
  """Images / s / chip the train step consumes on v5p at 40 % MFU with cached text features."""
  from lidit_jax import configs, plan
  c = configs.load_config_file(config_path)
  c.data.image_size = size
  c.text.cache = "cached"
  f = plan.step_flops(c)
  per_image = (f["train"] + f["towers"]) / c.train.batch_size
  return 0.4 * plan.CHIP_PEAK_TFLOPS["v5p"] * 1e12 / per_image


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--images", type=int, default=240)
  ap.add_argument("--batches", type=int, default=40, help="timed batches of 16 per setting (after 4 untimed)")
  ap.add_argument("--no-record", action="store_true", help="do not touch RESULTS.md")
  args = ap.parse_args()
  import jax
  from lidit_jax import configs
  from lidit_jax.data import pipeline, prepare
  k = cores()
  with tempfile.TemporaryDirectory() as tmp:
    write_photos(os.path.join(tmp, "src"), args.images)
    t = time.perf_counter()
    summary = prepare.prepare(os.path.join(tmp, "src"), os.path.join(tmp, "tfds"), "bench", workers=k, progress=False)
    prep = summary["examples"] / (time.perf_counter() - t)
    source, sizes, _ = pipeline.open_dataset(os.path.join(tmp, "tfds"), "bench")
    result = {"date": datetime.date.today().isoformat(), "cores": k, "jax": jax.__version__,
              "machine": f"{platform.processor() or platform.machine()}, {k} cores", "images": len(source),
              "mean_pixels": float(np.mean(sizes[:, 0] * sizes[:, 1])), "prepare_images_per_s_per_core": prep / k,
              "settings": []}
    for size in (256, 512):
      result[f"decode_1core_{size}"] = decode_rate(source, size, min(len(source), 96))
      for buckets in (False, True):
        for workers in (0, k):
          c = configs.load_config_file("configs/lidit_1b.py")
          c.data.update(source="tfds", name="bench", data_dir=os.path.join(tmp, "tfds"), image_size=size,
                        buckets=buckets, workers=workers)
          c.train.batch_size = 16
          rate = pipeline_rate(c, args.batches)
          row = {"size": size, "buckets": buckets, "workers": workers, "images_per_s": rate,
                 "images_per_s_per_core": rate / k}
          result["settings"].append(row)
          print(json.dumps(row), flush=True)
  result["consume_lidit_1b_256"] = consumption("configs/lidit_1b.py", 256)
  result["consume_lidit_10b_512"] = consumption("configs/lidit_10b.py", 512)
  print(json.dumps(result))
  if not args.no_record:
    record(result)


SECTION = "## Data pipeline throughput (`python -m benchmarks.data_pipeline`)"


def record(r: dict) -> None:
  from benchmarks.compile_time import replace_section
  rows = "".join(
      f"| {s['size']} | {'buckets' if s['buckets'] else 'square'} | {'threads' if not s['workers'] else str(s['workers']) + ' processes'} "
      f"| {s['images_per_s']:.0f} | {s['images_per_s_per_core']:.0f} |\n" for s in r["settings"])
  best = {size: max(s["images_per_s_per_core"] for s in r["settings"] if s["size"] == size) for size in (256, 512)}
  need = {256: r["consume_lidit_1b_256"], 512: r["consume_lidit_10b_512"]}
  body = (
      f"{r['date']}, {r['machine']}, jax {r['jax']}. {r['images']} JPEG photos of {r['mean_pixels'] / 1e6:.2f} Mpixel "
      f"on average (aspect 1:2 to 2:1, shorter side 512-1024), prepared at {r['prepare_images_per_s_per_core']:.0f} "
      f"images / s / core. Batches of 16; images / s / core = the process's images / s over its {r['cores']} cores.\n\n"
      "| px | crops | decoding in | images / s | images / s / core |\n|---|---|---|---|---|\n" + rows +
      f"\nOne core decoding in a plain loop: {r['decode_1core_256']:.0f} images / s at 256 px, "
      f"{r['decode_1core_512']:.0f} at 512 px.\n\n"
      "Against the train step (from `plan`, v5p at 40 % MFU, text features cached): LI-DiT-1B at 256 px consumes "
      f"{need[256]:.0f} images / s / chip, so about {need[256] / best[256]:.1f} host cores per chip at the best rate "
      f"above; LI-DiT-10B at 512 px consumes {need[512]:.1f} images / s / chip, about {need[512] / best[512]:.2f} "
      "cores per chip. A v5p host has 4 chips and 208 vCPUs (52 per chip).\n")
  replace_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), SECTION, body)


if __name__ == "__main__":
  main()
