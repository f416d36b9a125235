"""Our PixArt transformer (`model.family=pixart`) against diffusers' PyTorch PixArtTransformer2DModel: same weights,
same tensors, one run.

  python -m benchmarks.pixart [--depth 4] [--latent 32] [--batch 4] [--reps 3] [--quick] [--no-record]

PixArt-Sigma's widths (1152 = 16 heads x 72, T5-XXL's 4096-wide caption through the caption projection, 300 text
tokens, learned sigma) at reduced depth (--depth; PixArt has 28) and resolution (--latent; Sigma samples 128), so
that both models and their AdamW states fit this machine together. diffusers builds and saves the model,
`diffusers_pixart.load` reads it (the outputs are checked equal first). float32 on all cores. Median seconds of a
training step (epsilon MSE on the noise half, backward, AdamW; ours jitted with the parameters donated) and of one
sampling evaluation (forward, no gradient); ratio = torch / ours (> 1: ours is faster). Prints one JSON line;
unless --quick / --no-record, adds a dated table to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

SIGMA = dict(num_attention_heads=16, attention_head_dim=72, caption_channels=4096, text_len=300)
QUICK = dict(num_attention_heads=2, attention_head_dim=16, caption_channels=64, text_len=16)


def measure(layout: dict, depth: int, latent: int, batch: int, reps: int) -> dict:
  import diffusers
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from benchmarks.vs_torch import _median_time, jax_step_times
  from lidit_jax.convert import diffusers_pixart
  from lidit_jax.models import pixart
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  heads, head_dim, caption, text_len = (layout[k] for k in ("num_attention_heads", "attention_head_dim",
                                                             "caption_channels", "text_len"))
  ref = diffusers.PixArtTransformer2DModel(
      num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=depth,
      caption_channels=caption, cross_attention_dim=heads * head_dim, sample_size=latent, patch_size=2,
      use_additional_conditions=False).float()
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    module, params = diffusers_pixart.load(d)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
  eps = rng.standard_normal(x.shape).astype(np.float32)
  t = rng.integers(0, 1000, batch).astype(np.float32)
  ctx = rng.standard_normal((batch, text_len, caption)).astype(np.float32)
  valid = np.arange(text_len)[None] < rng.integers(text_len // 4, text_len, (batch, 1))  # padded captions

  apply = lambda p, *a: module.apply({"params": p}, *a, method=pixart.forward)[..., :4]
  args = tuple(jnp.asarray(a) for a in (x, t, ctx, valid))
  tx_, te = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) for a in (x, eps))
  tt_, tc, tm = torch.from_numpy(t), torch.from_numpy(ctx), torch.from_numpy(valid.astype(np.float32))
  theirs = lambda: ref(tx_, encoder_hidden_states=tc, timestep=tt_, encoder_attention_mask=tm,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
  with torch.no_grad():  # the same model, or the timing means nothing
    gap = np.abs(np.asarray(jax.jit(apply)(params, *args)) - theirs().numpy().transpose(0, 2, 3, 1)).max()
  assert gap < 1e-3, gap

  ours_train_s, ours_fwd_s = jax_step_times(apply, params, args, jnp.asarray(eps), reps, lr=2e-5)
  del params
  ref.train()
  opt = torch.optim.AdamW(ref.parameters(), lr=2e-5)

  def theirs_train():
    opt.zero_grad(set_to_none=True)
    torch.mean((theirs() - te) ** 2).backward()
    opt.step()

  def theirs_forward():
    with torch.no_grad():
      theirs()

  theirs_train(), theirs_forward()
  theirs_train_s, theirs_fwd_s = _median_time(theirs_train, reps), _median_time(theirs_forward, reps)
  return {"width": heads * head_dim, "depth": depth, "caption_channels": caption, "text_len": text_len,
          "latent": latent, "batch": batch, "params": sum(p.numel() for p in ref.parameters()), "max_gap": float(gap),
          "ours_train_s": ours_train_s, "torch_train_s": theirs_train_s, "train_speedup": theirs_train_s / ours_train_s,
          "ours_forward_s": ours_fwd_s, "torch_forward_s": theirs_fwd_s, "sample_speedup": theirs_fwd_s / ours_fwd_s,
          "torch": torch.__version__, "jax": jax.__version__}


def main(argv=None) -> int:
  from benchmarks.unet import record_table
  p = argparse.ArgumentParser(prog="python -m benchmarks.pixart", description=__doc__.split("\n\n")[0])
  p.add_argument("--depth", type=int, default=4, help="transformer blocks (PixArt: 28)")
  p.add_argument("--latent", type=int, default=32, help="latent side (Sigma samples 128)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="a tiny layout, to check the script (not recorded)")
  p.add_argument("--no-record", action="store_true", help="print only")
  a = p.parse_args(argv)
  r = measure(QUICK if a.quick else SIGMA, 2 if a.quick else a.depth, 8 if a.quick else a.latent, a.batch, a.reps)
  print(json.dumps(r))
  if not (a.quick or a.no_record):
    record_table("PixArt transformer vs diffusers (`python -m benchmarks.pixart`)",
                 f"PixArt-Sigma widths ({r['width']}, caption {r['caption_channels']} x {r['text_len']} tokens, "
                 f"learned sigma), depth {r['depth']} (Sigma: 28), {r['latent']} x {r['latent']} latents, batch "
                 f"{r['batch']}, {r['params'] / 1e6:.1f} M parameters; same weights (outputs within "
                 f"{r['max_gap']:.0e}) and tensors, one process.", r)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
