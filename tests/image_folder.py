"""A prepare-able folder written by tests: shapes-demo images, real photos from scikit-image's package
data (no download), files in odd modes, and deliberately broken files. Also used by the data benchmark."""
from __future__ import annotations

import importlib.resources
import io
import json
import os

import numpy as np
from PIL import Image

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg")
# name -> skip reason that `prepare` must report
BROKEN = {"garbage": "unreadable", "cut_rocket": "truncated", "tiny": "too_small", "no_caption": "missing_caption",
          "blank_caption": "empty_caption", "bad_json": "bad_caption"}
# name -> conversion that `prepare` must report
ODD = {"camera_grey": "grey", "horse_rgba": "alpha", "chelsea_cmyk": "cmyk", "moon_16bit": "16bit",
       "dancer_animated": "animated"}


def skimage_image(name: str) -> Image.Image:
  img = Image.open(importlib.resources.files("skimage") / "data" / name)
  img.load()
  return img


def _caption(path_stem: str, captions):
  if isinstance(captions, str):
    with open(path_stem + ".txt", "w", encoding="utf-8") as f:
      f.write(captions)
  else:
    with open(path_stem + ".json", "w", encoding="utf-8") as f:
      json.dump(captions, f)


def write_folder(root: str, num_shapes: int = 24, shapes_size: int = 64, seed: int = 0) -> dict:
  """Writes the folder; returns {"good": n images that must be kept, "skipped": {reason: n}, "converted": {...}}."""
  from lidit_jax.data import shapes
  os.makedirs(os.path.join(root, "shapes"), exist_ok=True)
  os.makedirs(os.path.join(root, "photos"), exist_ok=True)
  src = shapes.ShapesSource(size=shapes_size, seed=seed)
  for i in range(num_shapes):
    ex = src.example(i)
    img = Image.fromarray(np.round((ex["image"] + 1.0) * 127.5).clip(0, 255).astype(np.uint8))
    stem = os.path.join(root, "shapes", f"{i:04d}")
    img.save(stem + ".png")
    _caption(stem, ex["caption"] if i % 2 else {"captions": [ex["caption"], f"synthetic: {ex['caption']}"]})
  photos = os.path.join(root, "photos")
  for name in PHOTOS:
    stem = os.path.join(photos, name.split(".")[0])
    with open(stem + "." + name.split(".")[1], "wb") as f:
      f.write((importlib.resources.files("skimage") / "data" / name).read_bytes())
    _caption(stem, [f"a photo: {name.split('.')[0]}", f"the {name.split('.')[0]} picture"])
  # Odd modes, converted by prepare.
  skimage_image("camera.png").save(os.path.join(photos, "camera_grey.png"))
  skimage_image("horse.png").save(os.path.join(photos, "horse_rgba.png"))
  skimage_image("chelsea.png").convert("CMYK").save(os.path.join(photos, "chelsea_cmyk.jpg"), quality=90)
  moon16 = np.asarray(skimage_image("moon.png"), np.uint16) * 257
  Image.fromarray(moon16).save(os.path.join(photos, "moon_16bit.png"))
  gif = skimage_image("no_time_for_that_tiny.gif")
  frames = []
  for k in range(min(gif.n_frames, 6)):
    gif.seek(k)
    frames.append(gif.convert("RGB").resize((gif.width * 8, gif.height * 8), Image.NEAREST))
  frames[0].save(os.path.join(photos, "dancer_animated.gif"), save_all=True, append_images=frames[1:], duration=80)
  for name in ODD:
    _caption(os.path.join(photos, name), f"a picture in an odd mode: {name}")
  # Broken files: each skipped for its reason.
  broken = os.path.join(root, "broken")
  os.makedirs(broken, exist_ok=True)
  rng = np.random.default_rng(seed)
  with open(os.path.join(broken, "garbage.jpg"), "wb") as f:
    f.write(rng.bytes(5000))
  rocket = (importlib.resources.files("skimage") / "data" / "rocket.jpg").read_bytes()
  with open(os.path.join(broken, "cut_rocket.jpg"), "wb") as f:
    f.write(rocket[: len(rocket) // 2])
  skimage_image("astronaut.png").resize((40, 30)).save(os.path.join(broken, "tiny.png"))
  for name in ("no_caption", "blank_caption", "bad_json"):
    skimage_image("coffee.png").save(os.path.join(broken, name + ".png"))
  for name in ("garbage", "cut_rocket", "tiny"):
    _caption(os.path.join(broken, name), f"a broken file: {name}")
  _caption(os.path.join(broken, "blank_caption"), "   \n ")
  with open(os.path.join(broken, "bad_json.json"), "w", encoding="utf-8") as f:
    f.write("{'caption': not json")
  return {"good": num_shapes + len(PHOTOS) + len(ODD), "skipped": {r: 1 for r in BROKEN.values()},
          "converted": sorted(ODD.values())}


def write_tar(folder: str, path: str, subdir: str = "photos"):
  """The images + captions of folder/subdir as one WebDataset tar (KEY.ext members, sorted by key)."""
  import tarfile
  with tarfile.open(path, "w") as tar:
    for fn in sorted(os.listdir(os.path.join(folder, subdir))):
      tar.add(os.path.join(folder, subdir, fn), arcname=fn)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  img.convert("RGB").save(buf, "JPEG", quality=quality)
  return buf.getvalue()
