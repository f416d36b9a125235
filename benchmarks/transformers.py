"""Our PixArt, Sana and Lumina 2 transformers against diffusers' PyTorch ones: same weights, same tensors, one run.

  python -m benchmarks.transformers [--family pixart|sana|lumina2 ...] [--depth 4] [--latent 32] [--batch 4]
      [--reps 3] [--quick] [--no-record]

Each family at its released widths (PixArt-Sigma 1152 with T5-XXL's 4096-wide caption; Sana 1.6 B 2240 with
Gemma-2's 2304; Lumina-Image 2.0 2304 with Gemma-2's) at reduced depth (--depth) and resolution (--latent), so that
both models and their AdamW states fit this machine together. diffusers builds and saves the model, our converter
reads it (the outputs are checked equal first). float32 on all cores. Median seconds of a training step (MSE on the
prediction, backward, AdamW; ours jitted with the parameters donated) and of one sampling evaluation (forward, no
gradient); ratio = torch / ours (> 1: ours is faster). Prints one JSON line per family; unless --quick /
--no-record, adds a dated table per family to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

# Per family: diffusers' class and its real widths at `depth` blocks (QUICK: tiny), our conversion, our forward, and
# the torch call on NCHW tensors (x, t, ctx, mask); `text_len` caption tokens of `caption` channels.
def _families(quick: bool):
  import diffusers
  from lidit_jax.convert import diffusers_lumina2, diffusers_pixart, diffusers_sana
  from lidit_jax.models import lumina2, pixart, sana
  pixart_kw = (dict(num_attention_heads=2, attention_head_dim=16, caption_channels=64, cross_attention_dim=32) if quick
               else dict(num_attention_heads=16, attention_head_dim=72, caption_channels=4096, cross_attention_dim=1152))
  sana_kw = (dict(num_attention_heads=2, attention_head_dim=16, num_cross_attention_heads=2, cross_attention_head_dim=16,
                  cross_attention_dim=32, caption_channels=64) if quick else
             dict(num_attention_heads=70, attention_head_dim=32, num_cross_attention_heads=20,
                  cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304))
  lumina_kw = (dict(hidden_size=48, num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 8, 8),
                    cap_feat_dim=64) if quick else
               dict(hidden_size=2304, num_attention_heads=24, num_kv_heads=8, axes_dim_rope=(32, 32, 32),
                    cap_feat_dim=2304))
  return {
      "pixart": dict(  # PixArt-Sigma: T5-XXL's 4096-wide caption, 300 tokens, learned sigma (the noise half timed)
          build=lambda depth, latent: diffusers.PixArtTransformer2DModel(
              in_channels=4, out_channels=8, num_layers=depth, sample_size=latent, patch_size=2,
              use_additional_conditions=False, **pixart_kw),
          load=diffusers_pixart.load, method=pixart.forward, channels=4, caption=pixart_kw["caption_channels"],
          text_len=16 if quick else 300, time=lambda t: t,
          call=lambda ref, x, t, c, m: ref(x, encoder_hidden_states=c, timestep=t, encoder_attention_mask=m,
                                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]),
      "sana": dict(  # Sana 1.6 B: Gemma-2-2B's 2304-wide caption, 300 tokens, 32-channel DC-AE latents, patch 1
          build=lambda depth, latent: diffusers.SanaTransformer2DModel(
              in_channels=32, out_channels=32, num_layers=depth, sample_size=latent, patch_size=1, **sana_kw),
          load=diffusers_sana.load, method=sana.forward, channels=32, caption=sana_kw["caption_channels"],
          text_len=16 if quick else 300, time=lambda t: t,
          call=lambda ref, x, t, c, m: ref(x, encoder_hidden_states=c, timestep=t, encoder_attention_mask=m).sample),
      "lumina2": dict(  # Lumina-Image 2.0: Gemma-2-2B's caption, 256 tokens, 16-channel latents, patch 2
          build=lambda depth, latent: diffusers.Lumina2Transformer2DModel(
              in_channels=16, num_layers=depth, num_refiner_layers=2, sample_size=latent, patch_size=2, **lumina_kw),
          load=diffusers_lumina2.load, method=lumina2.forward, channels=16, caption=lumina_kw["cap_feat_dim"],
          text_len=16 if quick else 256, time=lambda t: t / 1000.0,
          call=lambda ref, x, t, c, m: ref(x, t, c, m).sample),
  }


def measure(family: str, depth: int, latent: int, batch: int, reps: int, quick: bool = False) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from benchmarks.vs_torch import _median_time, jax_step_times
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  f = _families(quick)[family]
  ref = f["build"](depth, latent).float()
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    module, params = f["load"](d)
  rng = np.random.default_rng(0)
  ch, caption, text_len = f["channels"], f["caption"], f["text_len"]
  x = rng.standard_normal((batch, latent, latent, ch)).astype(np.float32)
  eps = rng.standard_normal(x.shape).astype(np.float32)
  t = f["time"](rng.integers(0, 1000, batch).astype(np.float32))
  ctx = rng.standard_normal((batch, text_len, caption)).astype(np.float32)
  valid = np.arange(text_len)[None] < rng.integers(text_len // 4, text_len, (batch, 1))  # padded captions

  apply = lambda p, *a: module.apply({"params": p}, *a, method=f["method"])[..., :ch]
  args = tuple(jnp.asarray(a) for a in (x, t, ctx, valid))
  tx_, te = (torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))) for a in (x, eps))
  tt_, tc, tm = torch.from_numpy(t), torch.from_numpy(ctx), torch.from_numpy(valid.astype(np.int64))
  theirs = lambda: f["call"](ref, tx_, tt_, tc, tm)
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
  return {"family": family, "depth": depth, "caption_channels": caption, "text_len": text_len, "latent": latent,
          "channels": ch, "batch": batch, "params": sum(p.numel() for p in ref.parameters()), "max_gap": float(gap),
          "ours_train_s": ours_train_s, "torch_train_s": theirs_train_s, "train_speedup": theirs_train_s / ours_train_s,
          "ours_forward_s": ours_fwd_s, "torch_forward_s": theirs_fwd_s, "sample_speedup": theirs_fwd_s / ours_fwd_s,
          "torch": torch.__version__, "jax": jax.__version__}


NAMES = {"pixart": "PixArt-Sigma", "sana": "Sana 1.6 B", "lumina2": "Lumina-Image 2.0"}


def main(argv=None) -> int:
  from benchmarks.unet import record_table
  p = argparse.ArgumentParser(prog="python -m benchmarks.transformers", description=__doc__.split("\n\n")[0])
  p.add_argument("--family", choices=sorted(NAMES), action="append", help="repeatable (default: all three)")
  p.add_argument("--depth", type=int, default=4, help="transformer blocks (the released models: 20 to 28)")
  p.add_argument("--latent", type=int, default=32, help="latent side (the released models sample 32 to 128)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="tiny layouts, to check the script (not recorded)")
  p.add_argument("--no-record", action="store_true", help="print only")
  a = p.parse_args(argv)
  for family in a.family or sorted(NAMES):
    r = measure(family, 2 if a.quick else a.depth, 8 if a.quick else a.latent, a.batch, a.reps, a.quick)
    print(json.dumps(r), flush=True)
    if not (a.quick or a.no_record):
      record_table(f"{NAMES[family]} transformer vs diffusers (`python -m benchmarks.transformers --family {family}`)",
                   f"{NAMES[family]}'s widths (caption {r['caption_channels']} x {r['text_len']} tokens), depth "
                   f"{r['depth']}, {r['latent']} x {r['latent']} x {r['channels']} latents, batch {r['batch']}, "
                   f"{r['params'] / 1e6:.1f} M parameters; same weights (outputs within {r['max_gap']:.0e}) and "
                   "tensors, one process.", r)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
