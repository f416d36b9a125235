"""Encode a prepared image dataset once into the autoencoder's latents, so training skips decoding and the
autoencoder (`data.source=features`):

  python -m lidit_jax.data.latents --config configs/shapes.py --config.data.name=my_photos \\
      --config.data.data_dir=data --out data --name my_photos_latents
  python -m lidit_jax.train --config configs/shapes.py --config.data.source=features \\
      --config.data.name=my_photos_latents --config.data.data_dir=data [--config.text.cache=DIR] --workdir runs/x

Reads the config's prepared dataset (data.name / data.data_dir), centre-crops each image to the config's
resolution (with data.buckets, to its nearest bucket shape that holds train.batch_size images; training
must then use buckets too), encodes it with the config's autoencoder, and writes a TFDS dataset whose
records hold the latent (float16 bytes and its shape), the captions and the key. A VAE's latent is its
posterior, channels [mean | std] in the denoiser's scale (`autoencoder.stored`), so training still draws a
sample each step; pixel space stores the image in [-1, 1]. Text features come from `encode_prompts` (text.cache) or the towers,
as with images. Undecodable images are skipped and counted. Ends with one JSON line.
"""
from __future__ import annotations

import collections
import json
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from absl import flags
from tqdm import tqdm

from lidit_jax import configs, autoencoder as autoencoder_lib
from lidit_jax.data import images, pipeline, prepare


def features():
  import tensorflow_datasets as tfds  # local: heavy (TensorFlow): only the tfds data paths load it
  f = tfds.features
  return f.FeaturesDict({
      "latent": f.Tensor(shape=(), dtype=np.object_, doc="float16 latent, C order, shape in `shape`"),
      "shape": f.Tensor(shape=(3,), dtype=np.int32, doc="(height, width, channels) of the latent"),
      "captions": f.Sequence(f.Text()),
      "key": f.Text(doc="the source record's key"),
  })


def encode(config, out: str, name: str, batch_size: int = 64, shard_size: int = 2048, overwrite: bool = False,
           progress: bool = True) -> dict:
  t0 = time.time()
  feats = features()
  writer = prepare.DatasetWriter(out, name, feats, shard_size, overwrite)  # refuses an existing one before work
  d = config.data
  source, sizes, path = pipeline.open_dataset(d.data_dir, d.name, d.split)
  # As the image pipeline does: a bucket that cannot fill train.batch_size is merged into its neighbour.
  assign, shapes = pipeline.assign_buckets(pipeline.record_sizes(source, sizes), pipeline.image_shapes(config),
                                           config.train.batch_size, [(0, len(source))])
  ae, ae_params = autoencoder_lib.build(config.autoencoder)
  enc = jax.jit(lambda x: ae.stored(ae_params, autoencoder_lib.from_uint8(x)))
  skipped, pending = collections.Counter(), collections.defaultdict(list)

  def load(i):
    rec = source[i]
    try:
      return i, images.decode_crop(rec["image"], *shapes[assign[i]]), rec["captions"], rec["key"]
    except Exception:
      return i, None, None, rec["key"]

  with writer, ThreadPoolExecutor(8) as ex:
    def flush(b):
      items, pending[b] = pending[b], []
      lat = np.asarray(enc(np.stack([x[1] for x in items])), np.float16)
      for (_, _, caps, key), z in zip(items, lat):
        writer.write(feats.serialize_example({"latent": z.tobytes(), "shape": np.asarray(z.shape, np.int32),
                                              "captions": list(caps), "key": key}), z.shape[:2])

    # Decoded a window at a time: Executor.map submits everything at once and would hold every image.
    window = 8 * batch_size
    loaded = (item for lo in range(0, len(source), window)
              for item in ex.map(load, range(lo, min(lo + window, len(source)))))
    for item in tqdm(loaded, total=len(source), desc=f"encode {name}", unit="img", disable=not progress,
                     dynamic_ncols=True):
      if item[1] is None:
        skipped["unreadable"] += 1
        continue
      b = assign[item[0]]
      pending[b].append(item)
      if len(pending[b]) == batch_size:
        flush(b)
    for b in list(pending):
      if pending[b]:
        flush(b)
    return writer.finish(f"Latents of {path} by lidit_jax ({config.autoencoder.kind} autoencoder).", {
        "data_dir": out, "source": path, "skipped": dict(skipped), "image_shapes": [list(s) for s in shapes],
        "autoencoder": config.autoencoder.to_dict(), "seconds": round(time.time() - t0, 2)})


def main(argv):
  f = flags.FLAGS
  config = configs.load_from_flags()
  summary = encode(config, f.out, f.name, f.batch_size, f.shard_size, f.overwrite)
  print(json.dumps(summary))


if __name__ == "__main__":
  from lidit_jax import cli
  configs.define_flags()
  flags.declare_key_flag("config")
  flags.DEFINE_string("out", None, "TFDS data_dir to write the latents dataset into.", required=True)
  flags.DEFINE_string("name", None, "Name of the latents dataset (snake_case).", required=True)
  flags.DEFINE_integer("batch_size", 64, "Images per autoencoder call.")
  flags.DEFINE_integer("shard_size", 2048, "Records per ArrayRecord shard.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of that name (when the new one is complete).")
  cli.run(main)
