"""Build a TFDS image-text dataset (ArrayRecord) once from your files; training streams it with grain.

  python -m lidit_jax.data.prepare --src photos/ --out data/ [--name my_photos]
  python -m lidit_jax.data.prepare --src 'shards/*.tar' --out data/ --name laion_part  # WebDataset tars

Inputs: a folder of images with sidecar captions (`cat.jpg` + `cat.txt`, or `cat.json` holding a string,
a list of strings, or an object with "caption(s)" / "text" / "prompt"), searched recursively; or
WebDataset tar shards (members `KEY.jpg` + `KEY.txt` / `KEY.json`). Every record holds the image bytes
(plain RGB JPEG / PNG / WebP kept as they are; other modes converted and re-encoded), its size, all its
captions and a stable key (the path without extension; `TAR_NAME/KEY` for tars).

Bad files are skipped and counted by reason, never fatal: unreadable or truncated images, images below
--min_size, missing / empty / unparseable captions, duplicate keys, and files too large to read (`too_large`:
a file or tar member over --max_bytes, or an image whose header declares more than --max_pixels; both are
checked before the bytes are read or decoded, so memory stays bounded by the largest allowed image). Odd
modes (grey, palette, RGBA, CMYK, 16-bit, animated, EXIF-rotated) are converted and counted. An unreadable
tar is an error naming it.

Writes DATA_DIR/NAME/1.0.0/ (TFDS metadata, NAME-train.array_record-*, lidit_sizes.npy with every
record's (height, width) for aspect-ratio buckets, lidit_prepare.json), built in a temporary directory
and renamed when complete (`outputs.staged`); an existing one is rebuilt only with --overwrite. Ends with
one JSON line: examples written, skip and conversion counts.

No TensorFlow is needed: images are stored as encoded bytes (a scalar bytes tensor, not tfds' Image
feature, whose encoder needs TensorFlow) and decoded with Pillow at training time.
"""
from __future__ import annotations

import collections
import glob
import json
import multiprocessing
import os
import re
import tarfile
import time

import numpy as np
from absl import flags
from tqdm import tqdm

from lidit_jax import outputs
from lidit_jax.cli import UserError
from lidit_jax.data import images

VERSION = "1.0.0"
SPLIT = "train"
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
CAPTION_EXTS = {"txt", "json"}
SIZES_FILE = "lidit_sizes.npy"
STATS_FILE = "lidit_prepare.json"
_CAPTION_KEYS = ("captions", "caption", "text", "prompt")
# Byte limits, checked before a file or tar member is read. An image may take up to 8 bytes a pixel (16-bit
# RGBA, uncompressed) plus 1 MiB of metadata; without --max_pixels, 256 MiB. A caption past 1 MiB is no caption.
BYTES_PER_PIXEL, METADATA_BYTES = 8, 2 ** 20
DEFAULT_MAX_BYTES = 256 * 2 ** 20
MAX_CAPTION_BYTES = 2 ** 20


def byte_limit(max_pixels: int = 0, max_bytes: int = 0) -> int:
  """The largest image file read: `max_bytes`, else derived from `max_pixels`, else DEFAULT_MAX_BYTES."""
  if max_bytes < 0 or max_pixels < 0:
    raise ValueError(f"max_bytes={max_bytes}, max_pixels={max_pixels}: limits are >= 0. Fix: pass a positive "
                     "limit, or 0 for the default")
  if max_bytes:
    return max_bytes
  return max_pixels * BYTES_PER_PIXEL + METADATA_BYTES if max_pixels else DEFAULT_MAX_BYTES


def check_size(name: str, size: int, limit: int):
  if size > limit:
    flag = "" if limit == MAX_CAPTION_BYTES else " (--max_bytes)"
    raise images.Skip("too_large", f"{name} holds {size} bytes, over the limit of {limit}{flag}")


def features():
  import tensorflow_datasets as tfds  # local: heavy (TensorFlow): only the tfds data paths load it
  f = tfds.features
  return f.FeaturesDict({
      "image": f.Tensor(shape=(), dtype=np.object_, doc="encoded image bytes (JPEG / PNG / WebP), RGB"),
      "size": f.Tensor(shape=(2,), dtype=np.int32, doc="(height, width) in pixels"),
      "captions": f.Sequence(f.Text()),
      "key": f.Text(doc="stable id: source path without extension"),
  })


def parse_captions(raw: bytes, ext: str) -> list[str]:
  """Captions from a .txt (one caption; the whole file) or .json sidecar, or images.Skip."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise images.Skip("bad_caption", f"not UTF-8: {e}") from None
  if ext == "txt":
    found = [text]
  else:
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise images.Skip("bad_caption", f"invalid JSON: {e}") from None
    if isinstance(obj, dict):
      vals = [obj[k] for k in _CAPTION_KEYS if k in obj]
      obj = [c for v in vals for c in (v if isinstance(v, list) else [v])]
    found = obj if isinstance(obj, list) else [obj]
    if not all(isinstance(c, str) for c in found):
      raise images.Skip("bad_caption", f"expected strings, got {found!r:.80}")
  captions = list(dict.fromkeys(" ".join(c.split()) for c in found))  # collapse whitespace, dedupe
  captions = [c for c in captions if c]
  if not captions:
    raise images.Skip("empty_caption")
  return captions


# ------------------------------------------------------------------------------------------------
# Inputs: (key, image path or bytes, [(caption_ext, caption path or bytes)], duplicate key?)
# ------------------------------------------------------------------------------------------------
def _split_ext(name: str) -> tuple[str, str]:
  stem, dot, ext = name.rpartition(".")
  return (stem, ext.lower()) if dot else (name, "")


def folder_items(root: str):
  """Group files by path without extension; an image with no caption sidecar becomes a skip."""
  groups: dict[str, dict] = collections.defaultdict(lambda: {"images": [], "captions": []})
  for dirpath, _, files in os.walk(root):
    for fn in files:
      stem, ext = _split_ext(fn)
      key = os.path.relpath(os.path.join(dirpath, stem), root).replace(os.sep, "/")
      if ext in IMAGE_EXTS:
        groups[key]["images"].append((ext, os.path.join(dirpath, fn)))
      elif ext in CAPTION_EXTS:
        groups[key]["captions"].append((ext, os.path.join(dirpath, fn)))
  for key in sorted(groups):
    g = groups[key]
    for i, (_, path) in enumerate(sorted(g["images"])):
      yield key, path, sorted(g["captions"]), i > 0


def tar_items(paths: list[str], max_bytes: int = DEFAULT_MAX_BYTES):
  """WebDataset convention: members are grouped by basename up to the first dot, consecutive in the tar. A member
  over its byte limit is not read: it stands in its group as the Skip that `process` raises."""
  for path in paths:
    prefix = os.path.basename(path).split(".")[0]
    try:
      with tarfile.open(path, "r|*") as tar:
        key, group = None, None
        for m in tar:
          if not m.isfile():
            continue
          d, _, base = m.name.rpartition("/")
          k, _, ext = base.partition(".")
          k = f"{d}/{k}" if d else k
          if k != key:
            if group is not None:
              yield from _tar_group(prefix, key, group)
            key, group = k, {"images": [], "captions": []}
          ext = ext.lower().rpartition(".")[2]
          if ext in IMAGE_EXTS or ext in CAPTION_EXTS:
            kind = "images" if ext in IMAGE_EXTS else "captions"
            try:  # the declared size: a sparse member stores a few bytes and expands to all of it on read
              check_size(m.name, m.size, max_bytes if kind == "images" else MAX_CAPTION_BYTES)
              data = tar.extractfile(m).read()
            except images.Skip as skip:
              data = skip
            group[kind].append((ext, data))
        if group is not None:
          yield from _tar_group(prefix, key, group)
    except (tarfile.TarError, EOFError, OSError) as e:
      raise UserError(f"cannot read WebDataset shard {path}: {e}. Fix: re-download or re-create it, or "
                         "leave it out of --src.") from e


def _tar_group(prefix, key, group):
  for i, (_, data) in enumerate(group["images"]):
    yield f"{prefix}/{key}", data, group["captions"], i > 0


def _read(src, limit: int) -> bytes:
  """The bytes of `src` (a tar member's bytes or Skip, or a file's path), never more than `limit` of them."""
  if isinstance(src, images.Skip):
    raise src
  if isinstance(src, bytes):
    return src
  with open(src, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    check_size(src, size, limit)
    return f.read(size)  # what was checked, even if the file grows meanwhile


def process(item, min_size: int, max_pixels: int, max_bytes: int = DEFAULT_MAX_BYTES):
  """One input -> ("ok", key, serialized record, (h, w), conversions) or ("skip", key, reason, detail)."""
  key, image, caption_files, duplicate = item
  try:
    if duplicate:
      raise images.Skip("duplicate_key", "another image has the same name")
    if not caption_files:
      raise images.Skip("missing_caption", "no .txt or .json beside the image")
    captions = []
    for ext, src in caption_files:
      captions += parse_captions(_read(src, MAX_CAPTION_BYTES), ext)
    data, size, done = images.normalize(_read(image, max_bytes), min_size, max_pixels)
  except images.Skip as e:
    return "skip", key, e.reason, str(e)
  record = _FEATURES.serialize_example({"image": data, "size": np.asarray(size, np.int32),
                                        "captions": list(dict.fromkeys(captions)), "key": key})
  return "ok", key, record, size, done


_FEATURES = None


def _init_worker():
  global _FEATURES
  _FEATURES = features()


def _process_star(args):
  return process(*args)


class ShardWriter:
  """ArrayRecord shards of `shard_size` records, renamed to TFDS's NAME-SPLIT.array_record-i-of-n at the end."""

  def __init__(self, directory: str, name: str, shard_size: int):
    self.dir, self.name, self.shard_size = directory, name, shard_size
    self.lengths, self.num_bytes, self.writer = [], 0, None

  def write(self, record: bytes):
    from array_record.python.array_record_module import ArrayRecordWriter  # local: tfds paths
    if self.writer is None or self.lengths[-1] == self.shard_size:
      self._close()
      # group_size:1 keeps random access cheap (one record per chunk), what a global shuffle needs.
      self.writer = ArrayRecordWriter(os.path.join(self.dir, f"part-{len(self.lengths):05d}"), "group_size:1")
      self.lengths.append(0)
    self.writer.write(record)
    self.lengths[-1] += 1
    self.num_bytes += len(record)

  def _close(self):
    if self.writer is not None:
      self.writer.close()
      self.writer = None

  def finish(self) -> list[int]:
    self._close()
    n = len(self.lengths)
    for i in range(n):
      os.rename(os.path.join(self.dir, f"part-{i:05d}"),
                os.path.join(self.dir, f"{self.name}-{SPLIT}.array_record-{i:05d}-of-{n:05d}"))
    return self.lengths


def check_name(name: str) -> str:
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
    raise ValueError(f"--name {name!r}: TFDS names are snake_case (a lower-case letter, then a-z, 0-9, _). "
                     "Fix: pass e.g. --name my_photos.")
  return name


class DatasetWriter:
  """A TFDS dataset DATA_DIR/NAME/1.0.0, written in a temporary directory and renamed when complete
  (`outputs.staged`), so a crash leaves either the old dataset or the new one. Used as a context manager: the
  rename happens when the block ends without error; an error removes the temporary directory. Records are
  serialized examples of `features`; `sizes` go to lidit_sizes.npy. An existing dataset (or anything else at
  that path) is refused when the writer is made, before any work, unless `overwrite`."""

  def __init__(self, out: str, name: str, features, shard_size: int, overwrite: bool):
    self.name, self.features, self.shard_size = check_name(name), features, shard_size
    self.final = os.path.join(out, name, VERSION)
    if os.path.lexists(self.final) and not overwrite:  # a previous dataset too: rebuilding one is asked for
      raise FileExistsError(f"{self.final} already exists. Fix: pass --overwrite to rebuild it, or another --name.")
    self.staged = outputs.staged(self.final, overwrite=True, what="a prepared dataset")
    self.sizes: list = []

  def __enter__(self):
    self.tmp = self.staged.__enter__()
    os.makedirs(self.tmp)
    self.shards = ShardWriter(self.tmp, self.name, self.shard_size)
    return self

  def __exit__(self, kind, value, tb):
    return self.staged.__exit__(kind, value, tb)

  def write(self, record: bytes, size_hw):
    """One serialized record (`features.serialize_example(...)`) and its (height, width)."""
    self.shards.write(record)
    self.sizes.append(tuple(size_hw))

  def finish(self, description: str, summary: dict) -> dict:
    import tensorflow_datasets as tfds  # local: heavy (TensorFlow): only the tfds data paths load it
    lengths = self.shards.finish()
    if not self.sizes:
      raise UserError(f"no examples written: {summary}. Fix: check the input (see the skip counts).")
    tfds.folder_dataset.write_metadata(
        data_dir=self.tmp, features=self.features, check_data=False, description=description,
        split_infos=[tfds.core.SplitInfo(name=SPLIT, shard_lengths=lengths, num_bytes=self.shards.num_bytes)])
    np.save(os.path.join(self.tmp, SIZES_FILE), np.asarray(self.sizes, np.int32).reshape(-1, 2))
    summary = {"name": self.name, "path": self.final, "examples": len(self.sizes), "shards": len(lengths),
               "bytes": self.shards.num_bytes, **summary}
    with open(os.path.join(self.tmp, STATS_FILE), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    return summary  # renamed into place when the `with` block ends


def source_items(src: str, max_bytes: int = DEFAULT_MAX_BYTES):
  """(items, total or None, description) for a folder of images or WebDataset tars (file, folder, or glob)."""
  if os.path.isdir(src):
    items = list(folder_items(src))  # one walk of the tree
    tars = [] if items else sorted(glob.glob(os.path.join(src, "*.tar")))
    if tars:
      return tar_items(tars, max_bytes), None, f"{len(tars)} WebDataset shards in {src}"
    return items, len(items), f"image folder {src}"
  tars = sorted(glob.glob(src))
  if not tars:
    raise FileNotFoundError(f"--src {src!r} is neither a folder nor a file / glob that matches anything. "
                            "Fix: pass a folder of images with captions, or WebDataset .tar shards.")
  return tar_items(tars, max_bytes), None, f"{len(tars)} WebDataset shards matching {src}"


def prepare(src: str, out: str, name: str | None = None, min_size: int = 64, max_pixels: int = 0,
            shard_size: int = 2048, workers: int | None = None, overwrite: bool = False, progress: bool = True,
            max_bytes: int = 0) -> dict:
  """Build the dataset; returns the summary that the CLI prints as JSON. `max_bytes`: the largest image file or
  tar member read (0: `byte_limit(max_pixels)`)."""
  t0 = time.time()
  name = check_name(name or re.sub(r"[^a-z0-9_]", "_",
                                  os.path.basename(os.path.normpath(src.split("*")[0])).lower()).strip("_"))
  max_bytes = byte_limit(max_pixels, max_bytes)
  writer = DatasetWriter(out, name, features(), shard_size, overwrite)  # refuses an existing one before reading
  items, total, what = source_items(src, max_bytes)
  skipped, converted, examples = collections.Counter(), collections.Counter(), {}
  workers = workers or os.cpu_count() or 1
  args = ((it, min_size, max_pixels, max_bytes) for it in items)
  with writer:
    if workers > 1:
      pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker)
      results = pool.imap(_process_star, args, chunksize=8)  # ordered: the dataset is deterministic
    else:
      pool, results = None, map(_process_star, args)
      _init_worker()
    try:
      for r in tqdm(results, total=total, desc=f"prepare {name}", unit="img", disable=not progress, dynamic_ncols=True):
        if r[0] == "skip":
          skipped[r[2]] += 1
          examples.setdefault(r[2], f"{r[1]}: {r[3]}")
        else:
          writer.write(r[2], r[3])
          converted.update(r[4])
    finally:
      if pool is not None:
        pool.terminate()
    return writer.finish(f"Prepared by lidit_jax from {what}.", {
        "data_dir": out, "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
        "converted": dict(sorted(converted.items())), "skip_examples": examples, "seconds": round(time.time() - t0, 2)})


def main(argv):
  f = flags.FLAGS
  summary = prepare(f.src, f.out, f.name, f.min_size, f.max_pixels, f.shard_size, f.workers, f.overwrite,
                    max_bytes=f.max_bytes)
  summary.pop("skip_examples")
  print(json.dumps(summary))


if __name__ == "__main__":
  from lidit_jax import cli
  flags.DEFINE_string("src", None, "A folder of images + .txt/.json captions, or WebDataset .tar shards "
                      "(a .tar, a glob like 'shards/*.tar', or a folder holding them).", required=True)
  flags.DEFINE_string("out", None, "TFDS data_dir to write into (train with --config.data.data_dir=OUT).",
                      required=True)
  flags.DEFINE_string("name", None, "Dataset name, snake_case (default: from --src). Train with "
                      "--config.data.name=NAME.")
  flags.DEFINE_integer("min_size", 64, "Skip images whose shorter side is below this many pixels.")
  flags.DEFINE_integer("max_pixels", 0, "Skip images with more pixels than this, read from the header before "
                       "decoding (0: Pillow's own limit).")
  flags.DEFINE_integer("max_bytes", 0, "Skip image files and tar members larger than this many bytes, checked "
                       "before reading (0: 8 bytes a pixel of --max_pixels + 1 MiB, or 256 MiB without it).",
                       lower_bound=0)
  flags.DEFINE_integer("shard_size", 2048, "Records per ArrayRecord shard.")
  flags.DEFINE_integer("workers", 0, "Decoding processes (0: one per CPU core).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing DATA_DIR/NAME/1.0.0 (when the new one is complete).")
  cli.run(main)
