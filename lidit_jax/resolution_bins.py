"""Resolution binning (PixArt's and Sana's pipelines): a size asked is drawn at the trained bucket of the nearest
aspect ratio, then the decoded image is resized to cover the size asked and centre-cropped to it.

The buckets at base size 1024 (PixArt-alpha's table, keyed by the rounded ratio height / width the pipelines match
against); every other base scales them by base / 1024, and the 2048 / 4096 tables (PixArt-Sigma 2K, Sana 2K / 4K)
add seven extreme ratios."""
from __future__ import annotations

import jax

# (ratio key, height, width) at base 1024
BASE = ((0.25, 512, 2048), (0.28, 512, 1856), (0.32, 576, 1792), (0.33, 576, 1728), (0.35, 576, 1664),
        (0.4, 640, 1600), (0.42, 640, 1536), (0.48, 704, 1472), (0.5, 704, 1408), (0.52, 704, 1344),
        (0.57, 768, 1344), (0.6, 768, 1280), (0.68, 832, 1216), (0.72, 832, 1152), (0.78, 896, 1152),
        (0.82, 896, 1088), (0.88, 960, 1088), (0.94, 960, 1024), (1.0, 1024, 1024), (1.07, 1024, 960),
        (1.13, 1088, 960), (1.21, 1088, 896), (1.29, 1152, 896), (1.38, 1152, 832), (1.46, 1216, 832),
        (1.67, 1280, 768), (1.75, 1344, 768), (2.0, 1408, 704), (2.09, 1472, 704), (2.4, 1536, 640),
        (2.5, 1600, 640), (3.0, 1728, 576), (4.0, 2048, 512))
WIDE = ((0.26, 512, 1984), (0.27, 512, 1920), (2.89, 1664, 576), (3.11, 1792, 576), (3.62, 1856, 512),
        (3.75, 1920, 512), (3.88, 1984, 512))  # in the 2048 and 4096 tables only
SIZES = (256, 512, 1024, 2048, 4096)


def table(base: int) -> list[tuple[float, int, int]]:
  """The buckets of base size `base` (one of SIZES), ascending by ratio."""
  if base not in SIZES:
    raise ValueError(f"resolution bins: base size {base!r} has no table. Fix: use one of {SIZES} (0: no binning)")
  rows = BASE + (WIDE if base >= 2048 else ())
  return sorted((r, h * base // 1024, w * base // 1024) for r, h, w in rows)


def nearest(height: int, width: int, base: int) -> tuple[int, int]:
  """(height, width) of the bucket whose ratio key is nearest height / width (the first of a tie)."""
  ratio = height / width
  _, h, w = min(table(base), key=lambda row: abs(row[0] - ratio))
  return h, w


def resize_and_crop(images: jax.Array, height: int, width: int) -> jax.Array:
  """NHWC images scaled (bilinear, no antialiasing: torch's interpolate with align_corners=False) until they cover
  height x width, then centre-cropped to it."""
  h, w = images.shape[1:3]
  if (h, w) == (height, width):
    return images
  scale = max(height / h, width / w)
  rh, rw = int(h * scale), int(w * scale)
  images = jax.image.resize(images, (images.shape[0], rh, rw, images.shape[3]), "linear", antialias=False)
  top, left = (rh - height) // 2, (rw - width) // 2
  return images[:, top:top + height, left:left + width]
