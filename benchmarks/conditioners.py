"""What each conditioner adds to a training step over plain CLIP tokens, at SD 1.5 widths, and what the Diff
Adapter's scores add to the LLM tower's forward: one run, ratios.

  python -m benchmarks.conditioners [--latent 16] [--layers 1] [--batch 1] [--reps 3] [--quick] [--no-record]

Step: the U-Net family module (SD 1.5's blocks 320 / 640 / 1280 / 1280, 8 heads, cross-attention 768, --layers
resnets per block at --latent; conditioner included, every parameter trained: like for like) on precomputed text
features (towers excluded: encode_prompts caches them), epsilon MSE + AdamW, jitted, parameters donated; median
seconds. Conditioners: CLIP tokens as SD reads them (identity, 77 x 768: the baseline), LLM4GEN's CAM (CLIP + a
T5-XL-wide 2048 encoder, 128 tokens), plain LLM tokens (2048 wide, 128 tokens, projected), LI-DiT's refiners on two
LLMs (2 x 128 tokens), the Diff Adapter (a 16-block, 2048-wide LLM's scores, 128 tokens; the U-Net's second
cross-attentions). Towers: a decoder LLM's forward (--tower-width, 8 blocks, 128 tokens, batch 4) giving every
hidden state, against the scores read "diagonal" and "trajectory".
Prints one JSON line; unless --quick / --no-record, adds a dated table to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os

LLM = dict(hidden_size=2048, num_layers=16, max_length=128)


def variants() -> dict:
  """{name: dotted overrides of configs/sd15.py}: each conditioner on its towers (random: only shapes matter)."""
  from lidit_jax import configs
  clip = configs.tower(hidden_size=768, num_layers=12, max_length=77, mask_padding=False)
  llm = lambda **kw: configs.tower(**{**LLM, **kw})
  return {
      "CLIP tokens (identity, baseline)": {"text.use": "clip", "text.towers": {"clip": clip},
                                           "conditioner.kind": "identity"},
      "LLM4GEN CAM (CLIP + T5-XL width)": {"text.use": "clip,t5", "text.towers": {"clip": clip, "t5": llm(num_layers=2)},
                                           "conditioner.kind": "llm4gen", "conditioner.cam.clip": "clip",
                                           "conditioner.cam.llm": "t5"},
      "LLM tokens (projected)": {"text.use": "llm", "text.towers": {"llm": llm()}, "conditioner.kind": "tokens"},
      "LI-DiT refiners (2 LLMs)": {"text.use": "a,b", "text.towers": {"a": llm(), "b": llm()},
                                   "conditioner.kind": "refiners", "model.refiner.num_heads": 8},
      "Diff Adapter (scores of 16 blocks)": {"text.use": "llm", "text.towers": {"llm": llm(output="scores")},
                                             "conditioner.kind": "diff_adapter", "conditioner.diff.llm": "llm"},
  }


def step_seconds(overrides: dict, layers: int, latent: int, batch: int, reps: int, quick: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import flax.linen as nn
  from benchmarks.vs_torch import jax_step_times
  from lidit_jax import configs, model as model_lib
  c = configs.load_config_file("configs/sd15.py")
  c.model.dtype = "float32"
  c.unet.layers_per_block = layers
  if quick:
    c.unet.update(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_heads=4, norm_num_groups=8)
  c.data.image_size = latent * c.autoencoder.factor
  towers = overrides.pop("text.towers")
  c.text.towers = towers
  c = configs.apply_overrides(c, overrides)
  module = model_lib.build_model(c)
  abstract = model_lib.abstract_inputs(c, batch)
  rng = np.random.default_rng(0)
  inputs = jax.tree.map(lambda v: jnp.ones(v.shape, bool) if v.dtype == jnp.bool_ else
                        jnp.asarray(rng.standard_normal(v.shape), v.dtype), abstract)
  if inputs.get("drop_B") is not None:
    inputs["drop_B"] = jnp.zeros((batch,), bool)
  keys = list(inputs)
  params = nn.unbox(module.init(jax.random.key(0), **inputs))["params"]
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params.get("conditioner", {})))
  second = sum(int(np.prod(a.shape)) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]
               if "attn2_new" in jax.tree_util.keystr(p) or "attn_mix" in jax.tree_util.keystr(p))
  apply = lambda p, *a: module.apply({"params": p}, **dict(zip(keys, a)), rngs={"noise": jax.random.key(1)})
  target = jnp.asarray(rng.standard_normal((batch, latent, latent, c.autoencoder.channels)), jnp.float32)
  train_s, fwd_s = jax_step_times(apply, params, tuple(inputs[k] for k in keys), target, reps, lr=1e-5)
  return {"train_s": train_s, "forward_s": fwd_s, "conditioner_params": n, "second_attention_params": second}


def tower_seconds(width: int, reps: int, quick: bool) -> dict:
  """Forward seconds of a decoder LLM giving every hidden state, and its scores under both readings."""
  import time
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lidit_jax.models import llm
  cfg = llm.DecoderConfig(vocab_size=1000, hidden_size=width, num_layers=2 if quick else 8, num_heads=width // 128
                          or 1, num_kv_heads=max(1, width // 512), intermediate_size=width * 11 // 4)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (4, 128)))
  mask = jnp.ones_like(ids)
  base = llm.DecoderLM(cfg)
  params = jax.jit(base.init)(jax.random.key(0), ids, mask)
  out = {}
  for name, alone in (("hidden", None), ("diagonal", "diagonal"), ("trajectory", "trajectory")):
    f = jax.jit(base.clone(alone=alone).apply)
    f(params, ids, mask).block_until_ready()
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      f(params, ids, mask).block_until_ready()
      times.append(time.perf_counter() - t)
    out[name] = float(np.median(times))
  return {"tower_width": width, "tower_layers": cfg.num_layers, **out}


def record(r: dict, path: str = "benchmarks/RESULTS.md") -> None:
  import datetime
  import platform
  base = r["steps"]["CLIP tokens (identity, baseline)"]
  t = r["towers"]
  lines = ["\n## Conditioners: cost per training step over CLIP tokens, and the Diff Adapter's tower passes "
           "(`python -m benchmarks.conditioners`)\n",
           f"{datetime.date.today()}, {platform.machine()}, {len(os.sched_getaffinity(0))} cores, jax {r['jax']}, "
           f"float32. U-Net at SD 1.5 widths, {r['layers']} resnet(s) per block, {r['latent']} x {r['latent']} latents, "
           f"batch {r['batch']}, text features given (towers excluded), every parameter trained; median of "
           f"{r['reps']}, one process.\n",
           "| conditioner | conditioner params (M) | second cross-attn params (M) | train step s | x CLIP tokens | "
           "forward s | x CLIP tokens |", "|---|---|---|---|---|---|---|"]
  for name, s in r["steps"].items():
    lines.append(f"| {name} | {s['conditioner_params'] / 1e6:.1f} | {s['second_attention_params'] / 1e6:.1f} | "
                 f"{s['train_s']:.3f} | {s['train_s'] / base['train_s']:.2f} | {s['forward_s']:.3f} | "
                 f"{s['forward_s'] / base['forward_s']:.2f} |")
  lines += ["", f"Tower forward, decoder LLM {t['tower_width']} wide, {t['tower_layers']} blocks, 4 x 128 tokens:",
            "", "| output | s | x every hidden state |", "|---|---|---|"]
  for name in ("hidden", "diagonal", "trajectory"):
    label = {"hidden": "every hidden state", "diagonal": "scores, diagonal (default)",
             "trajectory": "scores, trajectory"}[name]
    lines.append(f"| {label} | {t[name]:.3f} | {t[name] / t['hidden']:.2f} |")
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
  import jax
  p = argparse.ArgumentParser(prog="python -m benchmarks.conditioners", description=__doc__.split("\n\n")[0])
  p.add_argument("--latent", type=int, default=16, help="latent side (SD 1.5 samples 64)")
  p.add_argument("--layers", type=int, default=1, help="resnets per block (SD 1.5: 2)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--tower-width", type=int, default=1024)
  p.add_argument("--quick", action="store_true", help="a tiny layout, to check the script (not recorded)")
  p.add_argument("--no-record", action="store_true", help="print only")
  a = p.parse_args(argv)
  steps = {}
  for name, overrides in variants().items():
    steps[name] = step_seconds(overrides, a.layers, 8 if a.quick else a.latent, a.batch, a.reps, a.quick)
    print(name, json.dumps(steps[name]), flush=True)
  r = {"steps": steps, "towers": tower_seconds(256 if a.quick else a.tower_width, a.reps, a.quick),
       "layers": a.layers, "latent": a.latent, "batch": a.batch, "reps": a.reps, "jax": jax.__version__}
  print(json.dumps(r))
  if not (a.quick or a.no_record):
    record(r)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
