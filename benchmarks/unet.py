"""Our U-Net against diffusers' PyTorch UNet2DConditionModel: same weights, same tensors, one run.

  python -m benchmarks.unet [--latent 16] [--layers 1] [--batch 1] [--reps 3] [--quick] [--no-record]

SD 1.5's widths (blocks 320 / 640 / 1280 / 1280, 8 heads, cross-attention 768, 77 text tokens) at reduced depth
(--layers resnets per block; SD 1.5 has 2) and resolution (--latent; SD 1.5 samples 64), so that both models and
their AdamW states fit this machine together. diffusers builds and saves the model, `load_unet` reads it. float32
on all cores. Median seconds of a training step (epsilon MSE, backward, AdamW; ours jitted with the parameters
donated) and of one sampling evaluation (forward, no gradient); ratio = torch / ours (> 1: ours is faster).
Prints one JSON line; unless --quick / --no-record, adds a dated table to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
QUICK = dict(block_out_channels=(32, 64), attention_head_dim=4, cross_attention_dim=32,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def measure(layout: dict, layers: int, latent: int, batch: int, reps: int, text_len: int = 77) -> dict:
  import diffusers
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from benchmarks.vs_torch import _median_time, jax_step_times
  from lidit_jax.convert.diffusers_unet import load_unet
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(sample_size=latent, layers_per_block=layers, **layout).float()
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    module, params = load_unet(d)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
  eps = rng.standard_normal(x.shape).astype(np.float32)
  t = rng.integers(0, 1000, batch).astype(np.float32)
  ctx = rng.standard_normal((batch, text_len, layout["cross_attention_dim"])).astype(np.float32)

  # ours: jitted train step (parameters and optimizer state donated) and forward
  args = tuple(jnp.asarray(a) for a in (x, t, ctx))
  ours_train_s, ours_fwd_s = jax_step_times(lambda p, *a: module.apply({"params": p}, *a), params, args,
                                            jnp.asarray(eps), reps, lr=1e-5)
  del params

  # theirs: the same tensors in NCHW
  ref.train()
  opt = torch.optim.AdamW(ref.parameters(), lr=1e-5)
  tx_, te = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) for a in (x, eps))
  tt_, tc = torch.from_numpy(t), torch.from_numpy(ctx)

  def theirs_train():
    opt.zero_grad(set_to_none=True)
    loss = torch.mean((ref(tx_, tt_, encoder_hidden_states=tc).sample - te) ** 2)
    loss.backward()
    opt.step()

  def theirs_forward():
    with torch.no_grad():
      ref(tx_, tt_, encoder_hidden_states=tc)

  theirs_train(), theirs_forward()
  theirs_train_s, theirs_fwd_s = _median_time(theirs_train, reps), _median_time(theirs_forward, reps)
  n = sum(p.numel() for p in ref.parameters())
  return {"blocks": list(layout["block_out_channels"]), "layers_per_block": layers, "latent": latent, "batch": batch,
          "text_len": text_len, "params": n, "ours_train_s": ours_train_s, "torch_train_s": theirs_train_s,
          "train_speedup": theirs_train_s / ours_train_s, "ours_forward_s": ours_fwd_s, "torch_forward_s": theirs_fwd_s,
          "sample_speedup": theirs_fwd_s / ours_fwd_s, "torch": torch.__version__, "jax": jax.__version__}


def record_table(title: str, setup: str, r: dict, path: str = "benchmarks/RESULTS.md") -> None:
  """A dated section: `setup` (what was measured), then train / sampling step seconds of both sides and their
  ratio (`r`: measure's keys)."""
  import datetime
  import platform
  lines = [f"\n## {title}\n",
           f"{datetime.date.today()}, {platform.machine()}, {len(os.sched_getaffinity(0))} cores, jax {r['jax']}, "
           f"torch {r['torch']}, float32. {setup}\n",
           "| figure | ours s | diffusers s | ratio (torch / ours; goal >= 1.0) |", "|---|---|---|---|",
           f"| train step (eps MSE + AdamW) | {r['ours_train_s']:.3f} | {r['torch_train_s']:.3f} | {r['train_speedup']:.2f} |",
           f"| sampling step (forward) | {r['ours_forward_s']:.3f} | {r['torch_forward_s']:.3f} | {r['sample_speedup']:.2f} |"]
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.unet", description=__doc__.split("\n\n")[0])
  p.add_argument("--latent", type=int, default=16, help="latent side (SD 1.5 samples 64)")
  p.add_argument("--layers", type=int, default=1, help="resnets per block (SD 1.5: 2)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="a tiny layout, to check the script (not recorded)")
  p.add_argument("--no-record", action="store_true", help="print only")
  a = p.parse_args(argv)
  r = measure(QUICK if a.quick else SD15, a.layers, 8 if a.quick else a.latent, a.batch, a.reps)
  print(json.dumps(r))
  if not (a.quick or a.no_record):
    record_table("U-Net vs diffusers (`python -m benchmarks.unet`)",
                 f"SD 1.5 widths {r['blocks']}, {r['layers_per_block']} resnet(s) per block (SD 1.5: 2), {r['latent']} x "
                 f"{r['latent']} latents, batch {r['batch']}, {r['text_len']} text tokens, {r['params'] / 1e6:.1f} M "
                 "parameters; same weights and tensors, one process.", r)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
