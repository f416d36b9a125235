"""The LoRA train step against the full fine-tune step at SD 1.5's U-Net widths: the shared trainer's step both
(`train_step.make_train_step`), one process, one run.

  python -m benchmarks.lora [--size 32] [--layers 1] [--batch 4] [--rank 16] [--reps 5] [--quick] [--no-record]

configs/shapes.py:unet with SD 1.5's U-Net (blocks 320 / 640 / 1280 / 1280, 8 heads, cross-attention 768;
--layers resnets per block, SD 1.5 has 2) on the demo's data (--size px, no autoencoder: the U-Net sees the pixels)
and its two tiny random text towers, float32. Full: every U-Net weight trains (AdamW state and EMA for all);
LoRA: `lora.rank` factors beside the attention projections (the family's default targets), the base frozen.
Per variant: the compiled step's memory (XLA's memory analysis of the jitted step: arguments + temporaries +
outputs not aliased; the CPU backend's, the layout a TPU's differs from: see `plan --topology` for chips) and the
median seconds of --reps steps after two warm-up steps. Prints one JSON line; unless --quick / --no-record, adds
a dated row to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

SD15_UNET = {"unet.block_out_channels": (320, 640, 1280, 1280), "unet.num_heads": 8, "unet.norm_num_groups": 32,
             "unet.down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "unet.up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "unet.cross_attention_dim": 768,
             "unet.use_linear_projection": False}
QUICK_UNET = {"unet.block_out_channels": (32, 64), "unet.num_heads": 2, "unet.norm_num_groups": 8,
              "unet.down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "unet.up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "unet.cross_attention_dim": 32}


def measure(overrides: dict, reps: int) -> dict:
  import jax
  import numpy as np
  from lidit_jax import configs, state as state_lib, train_step
  from lidit_jax.data import pipeline
  from lidit_jax.train import device_batch
  config = configs.validate(configs.apply_overrides(
      configs.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "shapes.py:unet")), overrides))
  s = state_lib.setup(config)
  state = s.init_state(jax.random.key(0))
  step = train_step.make_train_step(s)
  data = pipeline.make_batches(config, s.text_for)
  batch, rng = device_batch(next(data), s.mesh), jax.random.key(1)
  memory = step.jitted.lower(state, s.frozen, batch, rng).compile().memory_analysis()
  times = []
  for i in range(reps + 2):
    start = time.perf_counter()
    state, metrics = step(state, s.frozen, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  data.close()
  size = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
  return {"step_s": float(np.median(times[2:])), "loss": float(metrics["loss"]),
          "trained_params": sum(a.size for a in jax.tree.leaves(state.params)),
          "state_bytes": size(state), "frozen_bytes": size(s.frozen),
          "argument_bytes": memory.argument_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
          "peak_bytes": memory.argument_size_in_bytes + memory.temp_size_in_bytes
          + memory.output_size_in_bytes - memory.alias_size_in_bytes}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", type=int, default=32)
  ap.add_argument("--layers", type=int, default=1)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--quick", action="store_true", help="a tiny U-Net (a smoke run; nothing recorded)")
  ap.add_argument("--no-record", action="store_true")
  a = ap.parse_args()
  import jax
  base = {**(QUICK_UNET if a.quick else SD15_UNET), "unet.layers_per_block": a.layers, "data.image_size": a.size,
          "train.batch_size": a.batch, "train.num_steps": 1000, "optim.warmup_steps": 0, "model.dtype": "float32"}
  full = measure(base, a.reps)
  lora = measure({**base, "lora.rank": a.rank}, a.reps)
  r = {"size": a.size, "layers_per_block": a.layers, "batch": a.batch, "rank": a.rank, "full": full, "lora": lora,
       "speedup": full["step_s"] / lora["step_s"], "peak_ratio": lora["peak_bytes"] / full["peak_bytes"],
       "jax": jax.__version__, "quick": a.quick}
  print(json.dumps(r))
  if not (a.quick or a.no_record):
    record(r)


def record(r: dict, path: str = os.path.join(os.path.dirname(__file__), "RESULTS.md")) -> None:
  head = "\n## LoRA vs full fine-tuning, train step at SD 1.5's U-Net widths (`python -m benchmarks.lora`)\n"
  mib = lambda b: f"{b / 2 ** 20:.0f}"
  row = (f"| {datetime.date.today().isoformat()} | {platform.machine()}, {os.cpu_count()} cores, cpu | {r['jax']} | "
         f"{r['size']} px, {r['layers_per_block']} resnet/block, batch {r['batch']}, rank {r['rank']} | "
         f"{r['full']['trained_params'] / 1e6:.1f} M / {r['lora']['trained_params'] / 1e6:.2f} M | "
         f"{r['full']['step_s']:.2f} / {r['lora']['step_s']:.2f} ({r['speedup']:.2f}x) | "
         f"{mib(r['full']['peak_bytes'])} / {mib(r['lora']['peak_bytes'])} ({r['peak_ratio']:.2f}x) | "
         f"{mib(r['full']['temp_bytes'])} / {mib(r['lora']['temp_bytes'])} |\n")
  text = open(path).read()
  if head.strip() not in text:
    text = text.rstrip("\n") + "\n" + head + (
        "\nThe shared trainer's step, full fine-tuning against LoRA on the attention projections (full / LoRA in each "
        "column); peak: XLA's memory analysis of the compiled CPU step (arguments + temporaries + unaliased outputs), "
        "MiB.\n\n| date | machine | jax | shape | trained params | step s | peak MiB | temporaries MiB |\n"
        "|---|---|---|---|---|---|---|---|\n")
  start = text.index(head.strip())
  end = text.find("\n## ", start + 1)
  end = len(text) if end < 0 else end
  text = text[:end].rstrip("\n") + "\n" + row + text[end:]
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main()
