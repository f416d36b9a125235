"""Host-side batches: images plus the text input of every tower (tokens, or cached features).

Three sources, picked by `config.data.source`:
- "shapes": the embedded demo, rendered on the fly (index-addressable; the iterator state is one integer).
- "tfds": a dataset written by `python -m lidit_jax.data.prepare`, read with grain (`TfdsBatches`).
- "features": latents written by `python -m lidit_jax.data.latents` from such a dataset, read the same way.

"image" in a batch is uint8 pixels (the train step encodes them with the autoencoder) or float latents (the
`features` source: already encoded). Either way a resumed run sees exactly the batches it would have seen: the
state saved with each checkpoint is the number of batches consumed, and the pipeline is a pure function of it.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from absl import flags

from lidit_jax import autoencoder, denoisers
from lidit_jax.cli import UserError
from lidit_jax.data import images, prepare, shapes


def tokenize(towers, captions, negative: bool = False) -> dict:
  """{tower name: {input_ids, attention_mask, prompt_mask}} as numpy arrays (`negative`: as negative prompts,
  which some towers encode without their instruction)."""
  return {t.name: t.encoder(list(captions), negative=negative) for t in towers}


def make_batches(config, text_for):
  """The training iterator of `config.data.source` (each process reads its own part)."""
  if config.data.source == "shapes":
    return ShapesBatches(config, text_for)
  if config.data.source in ("tfds", "features"):
    return TfdsBatches(config, text_for)
  raise ValueError(f"config data.source={config.data.source!r} has no training pipeline. "
                   "Fix: use shapes, tfds or features.")


def held_out(config, text_for):
  """The held-out split's iterator for the validation loss (`data.eval_split`; the demo: its held-out compositions),
  at seed 0 whatever the run's seed, so that runs compare; opened here, so a missing split fails before compute."""
  c = config.copy_and_resolve_references()
  c.seed = 0
  if c.data.source == "shapes":
    return ShapesBatches(c, text_for, split="heldout")
  c.data.split = c.data.eval_split
  return TfdsBatches(c, text_for)


def image_shapes(config) -> list[tuple[int, int]]:
  """The (height, width) in pixels that training uses: the buckets' shapes, or one square of data.image_size."""
  d = config.data
  unit = denoisers.geometry(config).unit * config.autoencoder.factor
  return images.bucket_shapes(d.image_size, d.aspect_ratios if d.buckets else (1.0,), unit)


class ShapesBatches:
  """Infinite iterator over demo batches; each process reads its own slice of every global batch."""

  def __init__(self, config, text_for, split: str = "train"):
    """`text_for(captions)` gives the per-tower text inputs (`Setup.text_for`: tokens or cached features)."""
    self.source = shapes.ShapesSource(size=config.data.image_size, seed=config.seed, split=split,
                                      max_objects=config.data.max_objects)
    self.text_for = text_for
    self.global_batch = config.train.batch_size
    self.local_batch = self.global_batch // jax.process_count()
    self.index = 0  # global example index of the next batch

  def state(self) -> dict:
    return {"index": int(self.index)}

  def restore(self, state: dict):
    self.index = int(state["index"])

  def counters(self) -> dict:
    return {}

  def close(self):
    pass

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    start = self.index + jax.process_index() * self.local_batch
    b = self.source.batch(start, self.local_batch, uint8=True)  # pixels travel as bytes; the step encodes them
    self.index += self.global_batch
    return {"image": b["image"], "text": self.text_for(b["caption"]),
            "caption": b["caption"]}


# ------------------------------------------------------------------------------------------------
# Prepared TFDS datasets, read with grain
# ------------------------------------------------------------------------------------------------
def open_dataset(data_dir: str, name: str, split: str = "train"):
  """(data source, record sizes [N, 2] or None, version directory), or an error naming the path and the fix.
  Every shard file is opened once here, so a missing or corrupt one fails before any compute."""
  import tensorflow_datasets as tfds  # local: heavy (TensorFlow): only the tfds data paths load it
  from array_record.python.array_record_module import ArrayRecordReader  # local: tfds paths
  fix = (f"Fix: build it with `python -m lidit_jax.data.prepare --src YOUR_IMAGES --out {data_dir or 'DATA_DIR'} "
         f"--name {name or 'NAME'}`, or point --config.data.data_dir / --config.data.name at an existing one.")
  if not name or not data_dir:
    raise ValueError(f"data.source='tfds' needs data.name and data.data_dir (got {name!r}, {data_dir!r}). {fix}")
  if not os.path.isdir(os.path.join(data_dir, name)):
    raise FileNotFoundError(f"no TFDS dataset {name!r} in {data_dir} ({os.path.join(data_dir, name)} is not a "
                            f"directory). {fix}")
  builder = tfds.builder(name, data_dir=data_dir)
  if split not in builder.info.splits:
    raise ValueError(f"dataset {builder.data_dir} has no split {split!r}, only {list(builder.info.splits)}. "
                     "Fix: set --config.data.split.")
  for fn in builder.info.splits[split].filenames:
    path = os.path.join(builder.data_dir, fn)
    try:
      ArrayRecordReader(path).close()
    except Exception as e:
      raise UserError(f"cannot read shard {path}: {e}. Fix: rebuild the dataset with --overwrite.") from e
  source = builder.as_data_source(split=split)
  sizes_path = os.path.join(builder.data_dir, prepare.SIZES_FILE)
  sizes = np.load(sizes_path) if os.path.exists(sizes_path) else None
  if sizes is not None and len(sizes) != len(source):
    raise ValueError(f"{sizes_path} lists {len(sizes)} images but the dataset has {len(source)}. Fix: rebuild it.")
  return source, sizes, builder.data_dir


def record_sizes(source, sizes) -> np.ndarray:
  """Every record's (height, width): `sizes` from open_dataset, else read from the records (slow: a dataset
  that `prepare` did not write has no sizes file)."""
  return sizes if sizes is not None else np.stack([np.asarray(source[i]["size"]) for i in range(len(source))])


def assign_buckets(sizes, shapes_hw, global_batch: int, ranges, latents: bool = False) -> tuple[np.ndarray, list]:
  """Bucket of each record (nearest aspect ratio), after merging away buckets that cannot fill a global
  batch or that some process has no example of: those records are cropped to the nearest kept shape.
  latents=True: each size is one of the shapes, matched exactly, and a weak bucket's records are left out
  (bucket -1), since latents cannot be re-cropped. Returns (bucket per record, kept shapes)."""
  merge = not latents
  if latents:
    lookup = {tuple(s): b for b, s in enumerate(shapes_hw)}
    assign = np.array([lookup[tuple(s)] for s in np.asarray(sizes).tolist()], np.int64)
  else:
    assign = images.nearest_bucket(sizes, shapes_hw)
  kept = list(range(len(shapes_hw)))
  log_ar = {b: np.log(w / h) for b, (h, w) in enumerate(shapes_hw)}
  count = lambda a: np.bincount(a[a >= 0], minlength=len(shapes_hw))
  while len(kept) > (1 if merge else 0):  # merging needs one bucket left to merge into
    total = count(assign)
    least = np.min([count(assign[lo:hi]) for lo, hi in ranges], axis=0)
    weak = [b for b in kept if total[b] < global_batch or least[b] == 0]
    if not weak:
      break
    b = min(weak, key=lambda k: total[k])
    kept.remove(b)
    target = min(kept, key=lambda k: abs(log_ar[k] - log_ar[b])) if merge else -1
    assign[assign == b] = target
  remap = {b: i for i, b in enumerate(kept)}
  remap[-1] = -1
  return np.vectorize(remap.get, otypes=[np.int64])(assign), [shapes_hw[b] for b in kept]


class LoadBatch:
  """grain random map: record indices -> {"image" uint8 [B, h, w, 3], "caption" [B], "index" [B], "skipped"
  [reasons]}. Decoding runs in `threads` threads (Pillow releases the GIL); each example draws from its own
  generator seeded from the batch's, so results do not depend on thread timing. A record that fails to
  decode is replaced by a random one of the same bucket, and counted."""

  def __init__(self, source, height: int, width: int, pool: np.ndarray, threads: int = 8, tries: int = 16,
               latents: bool = False):
    self.source, self.height, self.width, self.pool, self.latents = source, height, width, pool, latents
    self.threads, self.tries, self._executor = threads, tries, None

  def __getstate__(self):  # worker processes get a copy without the thread pool
    return {**self.__dict__, "_executor": None}

  def _one(self, index: int, seed: int):
    rng = np.random.default_rng(seed)
    skipped = np.zeros(len(images.SKIP_REASONS), np.int32)
    for _ in range(self.tries):
      try:
        record = self.source[index]
        captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in record["captions"]]
        captions = [c for c in captions if c.strip()]
        if not captions:
          raise images.Skip("empty_caption")
        if self.latents:
          shape = tuple(int(k) for k in record["shape"])
          if shape[:2] != (self.height, self.width):
            raise images.Skip("unreadable", f"latent of shape {shape} in the {self.height}x{self.width} bucket")
          image = np.frombuffer(record["latent"], np.float16).reshape(shape)
        else:
          image = images.decode_crop(record["image"], self.height, self.width)
        return image, captions[int(rng.integers(len(captions)))], index, skipped
      except Exception as e:  # a corrupt record or image: count it, take another
        skipped[images.SKIP_REASONS.index(e.reason if isinstance(e, images.Skip) else "unreadable")] += 1
        index = int(self.pool[int(rng.integers(len(self.pool)))])
    raise UserError(f"{self.tries} records in a row could not be decoded (last: record {index}); the dataset "
                       "looks corrupt. Fix: rebuild it with `python -m lidit_jax.data.prepare --overwrite`.")

  def __call__(self, indices, rng: np.random.Generator) -> dict:
    seeds = rng.integers(2**63, size=len(indices))
    jobs = [(int(i), int(s)) for i, s in zip(indices, seeds)]
    if self.threads > 1:
      if self._executor is None:
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
      out = list(self._executor.map(lambda job: self._one(*job), jobs))
    else:
      out = [self._one(*job) for job in jobs]
    return {"image": np.stack([o[0] for o in out]), "caption": np.array([o[1] for o in out]),
            "index": np.array([o[2] for o in out], np.int64), "skipped": np.sum([o[3] for o in out], axis=0)}


class TfdsBatches:
  """Batches from a prepared TFDS dataset with grain: per-process shards, seeded shuffle, buckets.

  Process p of P owns records [p N/P, (p+1) N/P) (whole ArrayRecord files when the shard count divides
  evenly) and shuffles them each epoch with its own seed. Records go to the aspect-ratio bucket nearest to
  their shape (`data.buckets`), else to one square bucket of data.image_size. Per bucket: shuffle, repeat,
  decode + centre crop, batch; buckets are interleaved by their global sizes in an order every process
  computes alike, so all hosts feed the same shape at each step (one compilation per bucket shape).
  """

  def __init__(self, config, text_for, process_index: int | None = None, process_count: int | None = None,
               source=None, sizes=None):
    import grain  # local: only the tfds data paths
    d = config.data
    self.text_for = text_for
    self.workers, self.threads, self.prefetch = d.workers, d.threads, d.prefetch
    if source is None:
      source, sizes, self.path = open_dataset(d.data_dir, d.name, d.split)
    else:
      self.path = "<given source>"
    n = len(source)
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    self.global_batch = config.train.batch_size
    self.local_batch = self.global_batch // count
    per = n // count
    ranges = [(k * per, (k + 1) * per) for k in range(count)]
    if per < self.local_batch:
      raise ValueError(f"dataset {self.path} has {n} examples: fewer than train.batch_size={self.global_batch} "
                       f"over {count} process(es). Fix: lower the batch size or prepare more data.")
    wanted = image_shapes(config)
    latents = d.source == "features"
    if latents:  # records hold latents at bucket shapes: each must be one of this config's
      ae = config.autoencoder
      stored = autoencoder.stored_channels(ae)  # a VAE's posterior: [mean | std]
      have = int(np.asarray(source[0]["shape"])[2])
      if have != stored:
        raise ValueError(f"latents in {self.path} have {have} channels; autoencoder.kind={ae.kind!r} with "
                         f"{ae.channels} channels stores {stored}. Fix: train with the autoencoder they were "
                         "encoded with, or re-encode with python -m lidit_jax.data.latents.")
      f = ae.factor
      wanted = [(h // f, w // f) for h, w in wanted]
      odd = {tuple(s) for s in np.unique(sizes, axis=0)} - set(wanted)
      if odd:
        raise ValueError(f"latents in {self.path} have shapes {sorted(odd)}, not among this config's {wanted} "
                         "(data.image_size / data.buckets / autoencoder differ from the encoding run). Fix: "
                         "train with the config they were encoded with, or re-encode with python -m lidit_jax.data.latents.")
    elif len(wanted) > 1:
      sizes = record_sizes(source, sizes)
    else:  # one square bucket: sizes do not matter
      sizes = np.ones((n, 2), np.int32)
    assign, self.shapes = assign_buckets(sizes, wanted, self.global_batch, ranges, latents=latents)
    if not self.shapes:
      raise ValueError(f"no latent shape of {self.path} holds train.batch_size={self.global_batch} examples on "
                       f"every process. Fix: lower the batch size or encode more data.")
    self.dropped = int((assign < 0).sum())  # latents in buckets too small to fill a batch
    lo, hi = ranges[p]
    self.own = np.arange(lo, hi)
    totals = np.bincount(assign[assign >= 0], minlength=len(self.shapes))
    self.bucket_sizes = {f"{h}x{w}": int(totals[b]) for b, (h, w) in enumerate(self.shapes)}
    parts = []
    for b, (h, w) in enumerate(self.shapes):
      pool = self.own[assign[lo:hi] == b]
      ds = (grain.MapDataset.source(pool).seed(config.seed * 1009 + b).shuffle().repeat(None)
            .batch(self.local_batch, drop_remainder=True).random_map(LoadBatch(source, h, w, pool, d.threads, latents=latents)))
      parts.append(ds)
    # mix is deterministic given the weights, which are global counts: every process agrees on the order.
    self.dataset = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [float(totals[b]) for b in range(len(parts))])
    self.index = 0  # batches consumed
    self.skipped = np.zeros(len(images.SKIP_REASONS), np.int64)
    self._it = None

  def state(self) -> dict:
    return {"batch": int(self.index), "skipped": {r: int(k) for r, k in zip(images.SKIP_REASONS, self.skipped)}}

  def restore(self, state: dict):
    self.close()
    self.index = int(state["batch"])
    self.skipped = np.array([state.get("skipped", {}).get(r, 0) for r in images.SKIP_REASONS], np.int64)

  def counters(self) -> dict:
    """Records skipped at read time so far, by reason (this process), for the training log."""
    out = {f"data_skipped_{r}": int(k) for r, k in zip(images.SKIP_REASONS, self.skipped) if k}
    out["data_skipped"] = int(self.skipped.sum())
    if self.dropped:  # latents whose shape bucket cannot fill a batch (fixed for the run)
      out["data_left_out"] = self.dropped
    return out

  def _start(self):
    import grain  # local: only the tfds data paths
    # Elements are whole batches: read `prefetch` batches ahead, two at a time (each decodes in threads).
    ds = self.dataset[self.index:].to_iter_dataset(
        grain.ReadOptions(num_threads=min(2, self.prefetch), prefetch_buffer_size=self.prefetch))
    if self.workers > 0:
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library caller may not have parsed them
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=self.prefetch))
    self._it = iter(ds)

  def close(self):
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None

  def __iter__(self):
    return self

  def raw(self) -> dict:
    """The next batch as grain gives it (uint8 images, captions, record indices, skip counts)."""
    if self._it is None:
      self._start()
    b = next(self._it)
    self.index += 1
    self.skipped += b["skipped"]
    return b

  def __next__(self) -> dict:
    b = self.raw()
    captions = [str(c) for c in b["caption"]]
    # Images stay uint8 (a quarter of the bytes to move); the train step scales them to [-1, 1].
    return {"image": b["image"], "text": self.text_for(captions), "caption": captions, "index": b["index"]}
