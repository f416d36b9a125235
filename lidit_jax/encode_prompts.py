"""Cache the text towers' features for a caption set, so training can run without the LLMs in the step.

  python -m lidit_jax.encode_prompts --config configs/shapes.py --out runs/shapes_text
  python -m lidit_jax.train --config configs/shapes.py --config.text.cache=runs/shapes_text --workdir runs/x

Captions: by default every caption the training run will read from the config's data source
(train.num_steps x train.batch_size examples) plus the config's sample prompts; or --captions FILE (one
per line), which adds to them. See `lidit_jax/text_cache.py` for the format. Ends with one JSON line.
"""
from __future__ import annotations

import json

from absl import flags

from lidit_jax import configs, distributed, sharding, text_cache, model as model_lib
from lidit_jax.data import pipeline, shapes


def run_captions(config, num_examples: int | None = None) -> list[str]:
  """The captions a training run of `config` reads, in order, plus its sample prompts. For a prepared
  dataset (data.source=tfds): every caption of every record (the run picks one per example at random)."""
  if config.data.source == "tfds":
    source, _, _ = pipeline.open_dataset(config.data.data_dir, config.data.name, config.data.split)
    n = len(source) if num_examples is None else min(num_examples, len(source))
    captions = (c.decode("utf-8") for i in range(n) for c in source[i]["captions"])
    return list(dict.fromkeys(c for c in captions if c.strip())) + list(config.sample.prompts)
  if config.data.source != "shapes":
    raise ValueError(f"data.source={config.data.source!r}: enumerating its captions is not implemented; "
                     "pass --captions FILE instead.")
  src = shapes.ShapesSource(size=config.data.image_size, seed=config.seed, split="train",
                            max_objects=config.data.max_objects)
  n = config.train.num_steps * config.train.batch_size if num_examples is None else num_examples
  return [src.caption(i) for i in range(n)] + list(config.sample.prompts)


def main(argv):
  distributed.initialize()  # first: several processes (TPU VM workers, GPU nodes) become one runtime
  f = flags.FLAGS
  config = configs.load_from_flags()
  text_cache.check_out(f.out, f.overwrite)  # before loading the towers: a refused output costs no compute
  captions = [] if f.no_source else run_captions(config, f.num_examples)
  if f.captions:
    with open(f.captions, encoding="utf-8") as fh:
      captions += [line.strip() for line in fh if line.strip()]
  if config.conditioner.null == "empty_prompt":
    captions.append("")  # the unconditional text: dropped captions train on it
  towers = model_lib.build_towers(config)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.sharding_rules)
  with sharding.active(mesh, rules):
    params = model_lib.load_tower_params(config, towers, mesh, rules)
    summary = text_cache.write(f.out, config, towers, params, captions, f.batch_size, overwrite=f.overwrite)
  print(json.dumps(summary))


def define_flags():
  configs.define_flags()
  flags.declare_key_flag("config")
  flags.DEFINE_string("out", None, "Output directory of the cache: new or empty, unless --overwrite.", required=True)
  flags.DEFINE_bool("overwrite", False, "Replace what --out holds (when the new cache is complete).")
  flags.DEFINE_string("captions", None, "Text file of extra captions, one per line.")
  flags.DEFINE_boolean("no_source", False, "Do not enumerate the data source's captions (only --captions).")
  flags.DEFINE_integer("num_examples", None, "Examples of the data source to cover (default: "
                       "train.num_steps x train.batch_size for shapes, every record of a prepared dataset).")
  flags.DEFINE_integer("batch_size", 64, "Captions per tower call.")


if __name__ == "__main__":
  from lidit_jax import cli
  define_flags()
  cli.run(main)
