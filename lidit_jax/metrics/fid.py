"""Fréchet Inception Distance in JAX, with pytorch-fid's conventions, so its statistics files compare with ours.

  python -m lidit_jax.metrics fid A B --inception pt_inception-2015-12-05-6726825d.pth --allow-pickle
  python -m lidit_jax.metrics fid A --save_stats A.npz --inception WEIGHTS     # A's statistics, then exit

A / B: a folder of images (bmp, jpg, jpeg, pgm, png, ppm, tif, tiff, webp; not recursive, sorted) or an `.npz` of
statistics (`mu`: mean of the pool3 features, float64 [2048]; `sigma`: their covariance, `np.cov(rowvar=False)`),
pytorch-fid's layout. The weights are pytorch-fid's FID Inception (see `convert/fid_inception.py`).

Resize conventions (`--resize`), the two in use; statistics compare only when made the same way:
- pytorch_fid (default; also pytorch-fid's and clean-fid's "legacy_pytorch" numbers): each image read as RGB,
  scaled to float32 [0, 1] (x / 255), resized inside the network to 299 x 299, bilinear, no antialiasing (torch's
  `F.interpolate(align_corners=False)`), then 2x - 1.
- clean (clean-fid's default "clean" mode, Parmar et al. 2022): on the host, each channel of the uint8 RGB image
  as a float32 PIL image (mode 'F', values 0..255) resized to 299 x 299 with PIL's bicubic filter (antialiased),
  clipped to [0, 255]; the network then skips its resize and normalises as the TF graph does, (x - 128) / 128.
  clean-fid runs the TF graph's TorchScript export rather than pytorch-fid's port of the same weights, so its
  numbers agree with ours to the ports' float error, not bit for bit.
Unreadable images are skipped and counted (a warning names the first). pytorch-fid stacks a batch and so needs one
image size per folder; here an image whose size differs from the folder's first is resized on the host, by the same
bilinear rule, and batched with the rest. Batches are sharded over every local device.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import warnings
from typing import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from lidit_jax import cli, outputs
from lidit_jax.convert.fid_inception import load_fid_inception
from lidit_jax.models import inception

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's
RESIZE_MODES = ("pytorch_fid", "clean")
SIZE = inception.SIZE
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises for a broken file


# ---------------------------------------------------------------- images


def list_images(folder: str) -> list[str]:
  """The image files directly in `folder`, sorted (any case of the extensions; pytorch-fid's glob is lower case)."""
  names = sorted(n for n in os.listdir(folder) if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
  return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's bilinear resize along one axis (align_corners=False, no antialiasing): output
  i samples input (i + 0.5) * n_in / n_out - 0.5, clamped at 0, between its two neighbours (the last repeated)."""
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def resize_bilinear(image_HWC: np.ndarray, size: int = SIZE) -> np.ndarray:
  """The network's own resize, on the host (for an image whose size differs from its folder's first)."""
  rows, cols = bilinear_matrix(image_HWC.shape[0], size), bilinear_matrix(image_HWC.shape[1], size)
  return np.einsum("ih,hwc,jw->ijc", rows, image_HWC, cols, optimize=True).astype(np.float32)


def clean_resize(image_HWC_uint8: np.ndarray, size: int = SIZE) -> np.ndarray:
  """clean-fid's resize: each channel as a float32 PIL image resized bicubically, clipped to [0, 255]."""
  channels = [np.asarray(Image.fromarray(image_HWC_uint8[:, :, c].astype(np.float32), mode="F")
                         .resize((size, size), resample=Image.BICUBIC)) for c in range(3)]
  return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.float32)


def read_image(path: str, resize: str) -> np.ndarray:
  """[H, W, 3] float32 in [0, 1] (clean: already 299 x 299)."""
  with Image.open(path) as im:
    rgb = np.asarray(im.convert("RGB"))
  if resize == "clean":
    return clean_resize(rgb) / np.float32(255)
  return rgb.astype(np.float32) / np.float32(255)  # torchvision's ToTensor: float32 x / 255


def _prefetched(fn: Callable, items: list, workers: int, ahead: int) -> Iterator:
  """(item, fn(item) or the exception it raised) in order, at most `ahead` in flight (a folder never sits in memory)."""
  def guarded(item):
    try:
      return fn(item)
    except UNREADABLE as e:
      return e
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL decodes and resizes without the GIL
    queue = collections.deque()
    for item in items:
      queue.append((item, pool.submit(guarded, item)))
      if len(queue) >= ahead:
        done, fut = queue.popleft()
        yield done, fut.result()
    while queue:
      done, fut = queue.popleft()
      yield done, fut.result()


# ---------------------------------------------------------------- features


class FeatureExtractor:
  """Jitted pool3 features of image batches, each batch sharded over the local devices (a 1-D mesh, `batch`)."""

  def __init__(self, weights: str, allow_pickle: bool = False, resize: str = "pytorch_fid", batch_size: int = 50):
    if resize not in RESIZE_MODES:
      raise ValueError(f"--resize {resize!r} is not one of {RESIZE_MODES}. Fix: pick one")
    if batch_size < 1:
      raise ValueError(f"--batch_size {batch_size} must be at least 1")
    self.resize = resize
    clean = resize == "clean"
    self.module, params = load_fid_inception(weights, allow_pickle, resize_input=not clean,
                                             normalization="tensorflow" if clean else "pytorch_fid")
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)  # a multiple of the devices: equal shards
    mesh = Mesh(np.array(devices), ("batch",))
    self.data = NamedSharding(mesh, P("batch"))
    self.params = jax.device_put(params, NamedSharding(mesh, P()))
    self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, x), out_shardings=self.data)

  def __call__(self, images_BHWC: np.ndarray) -> np.ndarray:
    """Features [n, 2048] float32 of up to batch_size images of one size (the tail padded: one compile per size)."""
    n = len(images_BHWC)
    assert 0 < n <= self.batch_size, (n, self.batch_size)
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n, *images_BHWC.shape[1:]), np.float32)
      images_BHWC = np.concatenate([images_BHWC, pad])
    out = self._apply(self.params, jax.device_put(images_BHWC, self.data))
    return np.asarray(out)[:n]

  def many(self, images_NHWC: np.ndarray) -> np.ndarray:
    """Features [N, 2048] of any number of images of one size, batch by batch."""
    n = self.batch_size
    return np.concatenate([self(images_NHWC[i:i + n]) for i in range(0, len(images_NHWC), n)])

  def folder(self, folder: str, progress: bool = True) -> tuple[np.ndarray, int]:
    """(features [N, 2048] float32 of the folder's readable images, how many were skipped as unreadable)."""
    files = list_images(folder)
    if not files:
      raise cli.UserError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}). Fix: point at a folder of "
                          "images or at an .npz of statistics")
    queues: dict[tuple, list] = {}  # image size -> images waiting for a full batch
    feats, skipped, first_error, main_size = [], 0, None, None
    bar = tqdm(total=len(files), desc=f"FID features {os.path.basename(os.path.normpath(folder))}", unit="img",
               disable=not progress or jax.process_index() != 0)
    workers = min(8, len(os.sched_getaffinity(0)))
    for path, image in _prefetched(lambda p: read_image(p, self.resize), files, workers, 2 * self.batch_size):
      bar.update(1)
      if isinstance(image, Exception):
        skipped += 1
        first_error = first_error or f"{path}: {image}"
        continue
      main_size = main_size or image.shape
      if image.shape != main_size and image.shape[:2] != (SIZE, SIZE):  # one compile for the folder's size, one
        image = resize_bilinear(image)  # for 299: the odd sizes go through the network's resize on the host
      queue = queues.setdefault(image.shape, [])
      queue.append(image)
      if len(queue) == self.batch_size:
        feats.append(self(np.stack(queue)))
        queue.clear()
    for queue in queues.values():
      if queue:
        feats.append(self(np.stack(queue)))
    bar.close()
    if skipped:
      cli.warn(f"skipped {skipped} unreadable image{'s' * (skipped > 1)} of {len(files)} in {folder} "
               f"(first: {first_error})")
    return (np.concatenate(feats) if feats else np.zeros((0, 2048), np.float32)), skipped


# ---------------------------------------------------------------- statistics and distance


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of features [N, D] in float64, as pytorch-fid computes them."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise cli.UserError(f"FID statistics need at least 2 images; got {len(f)}. Fix: add images to the folder")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, overwrite: bool = False) -> None:
  """pytorch-fid's layout (np.savez_compressed, keys mu / sigma), written under a temporary name, then renamed."""
  with outputs.staged(path, overwrite=overwrite, what="an FID statistics file") as tmp:
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
      np.savez_compressed(f, mu=mu, sigma=sigma)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    with np.load(path) as f:
      missing = [k for k in ("mu", "sigma") if k not in f.files]
      if missing:
        raise cli.UserError(f"{path} holds {f.files}, not FID statistics (no {missing}). Fix: point at an .npz "
                            "written by pytorch-fid --save-stats or by --save_stats here")
      return np.asarray(f["mu"]), np.asarray(f["sigma"])
  except (ValueError, OSError, EOFError) as e:
    raise cli.UserError(f"cannot read FID statistics {path}: {e}. Fix: point at an .npz of mu / sigma") from e


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), the way pytorch-fid evaluates it: when the
  product's square root is not finite (a near-singular product), both covariances get `eps` on the diagonal; a
  root with a non-negligible imaginary diagonal is an error, a negligible one is dropped."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"FID statistics differ in size: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                     f"{sigma2.shape}. Fix: compare statistics of the same features (pool3, 2048)")
  diff = mu1 - mu2
  with warnings.catch_warnings(record=True) as caught:  # scipy's LinAlgWarning, said once in our words below
    warnings.simplefilter("always", linalg.LinAlgWarning)
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
      cli.warn(f"the covariance product is singular; adding {eps} to the diagonal of both")
      offset = np.eye(len(sigma1)) * eps
      root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if any(issubclass(w.category, linalg.LinAlgWarning) for w in caught):
    cli.warn(f"the covariance product is singular ({len(sigma1)} feature dimensions; rank-deficient covariances "
             "come from fewer images than that): the distance may be inaccurate")
  if np.iscomplexobj(root):
    if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
      raise ValueError(f"FID: the covariance product's square root has an imaginary part of "
                       f"{np.max(np.abs(root.imag)):.3g}. Fix: use more images than feature dimensions")
    root = root.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def frechet_distance_from_features(features, mu, sigma) -> float:
  """The same distance from one side's features [n, D] and the other's statistics, always defined: tr sqrt(S_a S_b)
  is the sum of the square roots of the eigenvalues of the n x n matrix X S_b X^T / (n - 1) (X: the centred
  features), which are S_a S_b's nonzero ones. Equals `frechet_distance` wherever that is defined; with fewer images
  than feature dimensions (S_a rank-deficient), where scipy's sqrtm often is not, this still gives the exact value
  (validation during training draws a few hundred images)."""
  f = np.asarray(features, np.float64)
  n = len(f)
  if f.ndim != 2 or n < 2:
    raise ValueError(f"FID needs at least 2 images; got {n}")
  mu_a = f.mean(axis=0)
  x = f - mu_a
  small = x @ np.asarray(sigma, np.float64) @ x.T / (n - 1)
  w = np.linalg.eigvalsh((small + small.T) / 2)
  root = np.sqrt(np.where(w > w.max() * 1e-12, w, 0.0)).sum()  # the zero eigenvalues' rounding noise dropped
  diff = mu_a - np.asarray(mu, np.float64)
  return float(diff @ diff + np.sum(x * x) / (n - 1) + np.trace(sigma) - 2 * root)


# ---------------------------------------------------------------- command line


def _is_stats(path: str) -> bool:
  return path.endswith(".npz")


def _check_input(path: str, name: str) -> None:
  if not os.path.exists(path):
    raise cli.NotFound(f"FID input {name} {path} does not exist. Fix: point at a folder of images or an .npz")
  if not _is_stats(path) and not os.path.isdir(path):
    raise cli.UserError(f"FID input {name} {path} is neither a folder of images nor an .npz of statistics")


def run(args) -> dict:
  """The `fid` subcommand: {"fid", "images_a", "images_b", "skipped_a", "skipped_b", ...}; with only A and
  --save_stats, A's statistics written and {"saved", "images_a", "skipped_a"}."""
  inputs = {"a": args.a, "b": args.b}
  if args.b is None and not args.save_stats:
    raise cli.UserError("fid was given one input. Fix: give two (A B), or A with --save_stats OUT.npz")
  for name, path in inputs.items():
    if path is not None:
      _check_input(path, name.upper())
  if args.save_stats:
    if _is_stats(args.a):
      raise cli.UserError(f"--save_stats: A {args.a} is already statistics. Fix: give a folder of images as A")
    if not args.save_stats.endswith(".npz"):
      raise cli.UserError(f"--save_stats {args.save_stats} does not end in .npz, which is how inputs are told "
                          "apart from folders. Fix: name it OUT.npz")
    outputs.check_target(os.path.abspath(args.save_stats), args.overwrite, what="an FID statistics file")
  extractor = None
  if any(p is not None and not _is_stats(p) for p in inputs.values()):
    if not args.inception:
      raise cli.UserError("--inception WEIGHTS is needed for a folder of images. Fix: pass pytorch-fid's "
                          "pt_inception-2015-12-05-6726825d.pth (with --allow-pickle) or its .safetensors")
    extractor = FeatureExtractor(args.inception, args.allow_pickle, args.resize, args.batch_size)
  result, stats = {}, {}
  for name, path in inputs.items():
    if path is None:
      continue
    if _is_stats(path):
      stats[name] = load_statistics(path)
      result[f"images_{name}"], result[f"skipped_{name}"] = None, None
    else:
      feats, skipped = extractor.folder(path, progress=not args.no_progress)
      stats[name] = statistics(feats)
      result[f"images_{name}"], result[f"skipped_{name}"] = len(feats), skipped
    if name == "a" and args.save_stats:
      save_statistics(args.save_stats, *stats["a"], overwrite=args.overwrite)
      result["saved"] = args.save_stats
  if args.b is not None:
    result = {"fid": frechet_distance(*stats["a"], *stats["b"]), **result}
  return {**result, "resize": args.resize}


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser("fid", help="Fréchet Inception Distance of two image folders or .npz statistics",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("a", metavar="A", help="a folder of images, or an .npz of statistics (mu, sigma)")
  p.add_argument("b", metavar="B", nargs="?", default=None, help="the same; leave out with --save_stats")
  p.add_argument("--inception", default=None,
                 help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (needs --allow-pickle) or a .safetensors "
                      "of its tensors; needed for any folder of images")
  p.add_argument("--batch_size", type=int, default=50, help="images per batch (rounded up to a multiple of the "
                                                            "local devices)")
  p.add_argument("--resize", choices=RESIZE_MODES, default="pytorch_fid",
                 help="pytorch_fid: bilinear inside the network (default); clean: clean-fid's PIL bicubic")
  p.add_argument("--save_stats", metavar="OUT.npz", default=None,
                 help="write A's statistics here (pytorch-fid's layout); with A only, write them and exit")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --save_stats file")
  p.add_argument("--allow-pickle", dest="allow_pickle", action="store_true",
                 help="read a .pth weights file (a pickle, which can run code; loaded in torch's weights-only mode)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.set_defaults(run=run)
  return p
