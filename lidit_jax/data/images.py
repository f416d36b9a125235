"""Image bytes -> RGB: the checks `prepare` runs once per file, and the decode + resize + crop that the
training pipeline runs per example. Pillow only (no TensorFlow).
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

# Why an input file is left out. `prepare` counts each; the training pipeline reports the same names.
SKIP_REASONS = ("unreadable", "truncated", "too_small", "too_large", "missing_caption", "empty_caption",
                "bad_caption", "duplicate_key")
KEEP_FORMATS = ("JPEG", "PNG", "WEBP")  # stored as they are when already plain 8-bit RGB


class Skip(Exception):
  """An input that cannot become a training example; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    assert reason in SKIP_REASONS, reason
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail

  def __reduce__(self):  # pickled by its fields: a worker process hands it over as it was made
    return Skip, (self.reason, self.detail)


def open_image(data: bytes, min_size: int = 0, max_pixels: int = 0) -> Image.Image:
  """Decode fully (a truncated file only fails on load), or raise Skip. The size the header declares is checked
  first, so an image over `max_pixels` (or under `min_size` on its shorter side) is never decoded."""
  try:
    img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise Skip("too_large", str(e)) from None
  except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, ValueError, SyntaxError ...
    raise Skip("unreadable", str(e)) from None
  w, h = img.size
  if min(w, h) < min_size:
    raise Skip("too_small", f"{w}x{h} is below --min_size={min_size}")
  if max_pixels and w * h > max_pixels:
    raise Skip("too_large", f"{w}x{h} has more than --max_pixels={max_pixels} pixels")
  try:
    img.load()
  except Exception as e:
    raise Skip("truncated" if "truncated" in str(e) or isinstance(e, (OSError, EOFError)) else "unreadable",
               str(e)) from None
  return img


def to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
  """Plain 8-bit RGB and upright, plus what was converted (for the summary): the first frame of an
  animation, EXIF rotation, 16-bit -> 8-bit, alpha composited on white, palette / grey / CMYK -> RGB."""
  done = []
  if getattr(img, "n_frames", 1) > 1:
    img.seek(0)
    img = img.copy()
    done.append("animated")
  orientation = img.getexif().get(0x0112, 1)
  if orientation != 1:
    img = ImageOps.exif_transpose(img)
    done.append("exif_rotated")
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (PNG gives "I" or "I;16")
    # Always the 16-bit range: a dark image (every value <= 255) must stay dark, not be read as 8-bit.
    a = np.asarray(img).astype(np.float64)
    img = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    done.append("16bit")
  elif img.mode == "F":
    a = np.asarray(img)
    img = Image.fromarray(np.clip(np.round(a * (255.0 if a.max(initial=0) <= 1.0 else 1.0)), 0, 255).astype(np.uint8), "L")
    done.append("float")
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    done.append("palette")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, rgba).convert("RGB")
    done.append("alpha")
  elif img.mode != "RGB":
    done.append({"L": "grey", "1": "grey", "CMYK": "cmyk"}.get(img.mode, img.mode.lower()))
    img = img.convert("RGB")
  return img, done


def normalize(data: bytes, min_size: int = 0, max_pixels: int = 0) -> tuple[bytes, tuple[int, int], list[str]]:
  """Check one encoded image: (bytes to store, (height, width), conversions). Plain RGB JPEG / PNG / WebP
  files are stored unchanged; anything converted is re-encoded (JPEG when it came from a JPEG, else PNG,
  which keeps graphics exact)."""
  img = open_image(data, min_size, max_pixels)
  fmt = img.format
  rgb, done = to_rgb(img)
  w, h = rgb.size  # EXIF rotation may swap them
  if not done and fmt in KEEP_FORMATS:
    return data, (h, w), done
  buf = io.BytesIO()
  if fmt == "JPEG":
    rgb.save(buf, "JPEG", quality=95)
  else:
    rgb.save(buf, "PNG")
  return buf.getvalue(), (h, w), done


def decode_crop(data: bytes, height: int, width: int) -> np.ndarray:
  """Encoded image -> uint8 [height, width, 3]: the largest centred crop with the target's aspect ratio,
  resized (bicubic). JPEGs are decoded at a reduced scale when much larger than needed (Pillow's draft)."""
  img = Image.open(io.BytesIO(data))
  if img.format == "JPEG":
    img.draft("RGB", (width, height))  # DCT scaling: never below the requested size
  if img.mode != "RGB":
    img, _ = to_rgb(img)
  w, h = img.size
  # Crop box in source pixels with the target aspect ratio, centred.
  if w * height > h * width:  # source wider than the target
    cw = h * width / height
    box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
  else:
    ch = w * height / width
    box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
  out = img.resize((width, height), Image.BICUBIC, box=box,
                   reducing_gap=None if max(w / width, h / height) < 3 else 2.0)
  return np.asarray(out, dtype=np.uint8)


def bucket_shapes(resolution: int, aspect_ratios, unit: int) -> list[tuple[int, int]]:
  """(height, width) per aspect ratio (width / height), about resolution**2 pixels, multiples of `unit`."""
  shapes = []
  for ar in aspect_ratios:
    h = max(unit, int(round(resolution / math.sqrt(ar) / unit)) * unit)
    w = max(unit, int(round(resolution * math.sqrt(ar) / unit)) * unit)
    if (h, w) not in shapes:
      shapes.append((h, w))
  return shapes


def nearest_bucket(sizes_hw: np.ndarray, shapes: list[tuple[int, int]]) -> np.ndarray:
  """Index of the bucket whose aspect ratio is closest (in log space) to each image's. int [N]."""
  sizes_hw = np.asarray(sizes_hw, np.float64).reshape(-1, 2)
  log_ar = np.log(sizes_hw[:, 1] / sizes_hw[:, 0])
  bucket_ar = np.log(np.array([w / h for h, w in shapes]))
  return np.argmin(np.abs(log_ar[:, None] - bucket_ar[None, :]), axis=1)
