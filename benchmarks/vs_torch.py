"""Side by side with PyTorch on this machine, in one process:

- our DiT configured as diffusers' `PixArtTransformer2DModel` (adaLN-single, sin-cos positions, no QK-norm,
  tanh-GELU MLP, the same widths; `PixArtLike` below) against that model: a training step (forward,
  backward, AdamW) and one network evaluation of sampling (forward, no gradient);
- our decoder LLM (`models/llm.py`) against transformers' `LlamaModel` of the same size, loaded from the same
  safetensors file: forward tokens per second.

Both sides run float32 on all cores (torch.set_num_threads = the cores this process may use). Speedup > 1
means we are faster. Used by `python -m benchmarks.run`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lidit_jax.models import dit as dit_lib, layers


class PixArtLike(nn.Module):
  """Timestep embedder + our DiT with PixArt-alpha's choices. Differences left: PixArt projects the caption
  (two D x D layers on the text tokens; our text arrives at width D from the refiners) and we add pooled text
  to the conditioning (one D x D layer)."""
  cfg: dit_lib.DiTConfig

  @nn.compact
  def __call__(self, x_BHWC, t_B, ctx_BSD, valid_BS):
    t_emb = layers.TimestepEmbedder(self.cfg.width, name="t_embedder")(t_B)
    pooled = layers.masked_mean(ctx_BSD, valid_BS)
    return dit_lib.DiT(self.cfg, name="denoiser")(x_BHWC, t_emb, pooled, ctx_BSD, valid_BS)


def pixart_configs(width: int, heads: int, depth: int, latent: int, channels: int = 4, patch: int = 2):
  ours = dit_lib.pixart_alpha(width, heads, depth, patch, channels)
  return ours, dit_lib.pixart_diffusers_kwargs(ours, latent)


def _median_time(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def torch_matmul_peak(n: int = 2048, reps: int = 10) -> float:
  import torch
  a = torch.ones(n, n)
  a @ a
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(reps):
      a @ a
    best = min(best, (time.perf_counter() - t) / reps)
  return 2 * n ** 3 / best / 1e9


def jax_step_times(apply, params, inputs, target, reps: int, lr: float = 1e-4) -> tuple[float, float]:
  """(train step seconds, forward seconds) of `apply(params, *inputs)`: MSE to `target` + AdamW, jitted with the
  parameters and optimizer state donated; medians after a compiling call each."""
  tx = optax.adamw(lr)
  loss_fn = lambda p, a, y: jnp.mean((apply(p, *a) - y) ** 2)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, o, a, y):
    loss, g = jax.value_and_grad(loss_fn)(p, a, y)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  forward = jax.jit(apply)
  state = {"p": params, "o": tx.init(params)}

  def train():
    state["p"], state["o"], loss = step(state["p"], state["o"], inputs, target)
    loss.block_until_ready()

  fwd = lambda: forward(state["p"], *inputs).block_until_ready()
  train(), fwd()  # compile
  return _median_time(train, reps), _median_time(fwd, reps)


def _ours_times(cfg, args, reps: int) -> tuple[float, float]:
  """(train step seconds, forward seconds) of PixArtLike(cfg): flow-matching loss + AdamW, params donated."""
  model = PixArtLike(cfg)
  params = nn.unbox(model.init(jax.random.key(0), *args[:4]))["params"]
  return jax_step_times(lambda p, *a: model.apply({"params": p}, *a), params, tuple(args[:4]), args[4], reps)


def dit_vs_pixart(width=1152, heads=16, depth=2, batch=4, latent=32, text_len=120, reps=3) -> dict:
  import torch
  from diffusers import PixArtTransformer2DModel
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  ours_cfg, theirs_cfg = pixart_configs(width, heads, depth, latent)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
  eps = rng.standard_normal(x0.shape).astype(np.float32)
  t = rng.uniform(size=batch).astype(np.float32)
  ctx = rng.standard_normal((batch, text_len, width)).astype(np.float32)
  valid = np.ones((batch, text_len), bool)
  valid[:, text_len // 2:] = rng.uniform(size=(batch, 1)) < 0.5  # some padded captions
  xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps

  args = [jnp.asarray(a) for a in (xt, t, ctx, valid, eps - x0)]
  # FLOPs, for both sides: XLA's count of the unrolled model (it counts a scanned loop's body only once).
  unrolled = PixArtLike(dataclasses.replace(ours_cfg, scan=False))
  u_params = jax.eval_shape(lambda: nn.unbox(unrolled.init(jax.random.key(0), *args[:4]))["params"])
  u_fwd = lambda p, *a: unrolled.apply({"params": p}, *a)
  u_loss = lambda p, *a: jnp.mean((u_fwd(p, *a[:4]) - a[4]) ** 2)
  cost = lambda f, *a: jax.jit(f).lower(*a).compile().cost_analysis()["flops"] / 1e9
  forward_gflop = cost(u_fwd, u_params, *args[:4])
  train_gflop = cost(lambda p, *a: jax.grad(u_loss)(p, *a), u_params, *args)  # forward + backward
  ours_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(u_params))
  # Ours: the flow-matching loss + AdamW, jitted, params donated; scanned blocks (the default) and unrolled.
  ours = {scan: _ours_times(dataclasses.replace(ours_cfg, scan=scan), args, reps) for scan in (True, False)}

  # Theirs: the same tensors in NCHW; timestep on PixArt's 0..1000 scale.
  ref = PixArtTransformer2DModel(**theirs_cfg).float().train()
  topt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
  txt = torch.from_numpy(xt.transpose(0, 3, 1, 2).copy())
  tt, tctx = torch.from_numpy(t * 1000), torch.from_numpy(ctx)
  tmask = torch.from_numpy(valid.astype(np.float32))
  target = torch.from_numpy((eps - x0).transpose(0, 3, 1, 2).copy())
  cond = {"resolution": None, "aspect_ratio": None}

  def theirs_train():
    topt.zero_grad(set_to_none=True)
    out = ref(txt, encoder_hidden_states=tctx, timestep=tt, encoder_attention_mask=tmask, added_cond_kwargs=cond).sample
    loss = torch.mean((out - target) ** 2)
    loss.backward()
    topt.step()

  def theirs_forward():
    with torch.no_grad():
      ref(txt, encoder_hidden_states=tctx, timestep=tt, encoder_attention_mask=tmask, added_cond_kwargs=cond)

  theirs_train()
  theirs_forward()
  theirs_train_s = _median_time(theirs_train, reps)
  theirs_fwd_s = _median_time(theirs_forward, reps)
  theirs_params = sum(p.numel() for p in ref.parameters())
  from benchmarks.demo_step import matmul_peak
  return {"width": width, "heads": heads, "depth": depth, "batch": batch, "latent": latent, "text_len": text_len,
          "train_gflop": train_gflop, "forward_gflop": forward_gflop, "jax_matmul_gflops": matmul_peak(),
          "torch_matmul_gflops": torch_matmul_peak(),
          "ours_params": ours_params, "torch_params": theirs_params,
          "ours_train_s": ours[True][0], "torch_train_s": theirs_train_s, "train_speedup": theirs_train_s / ours[True][0],
          "ours_forward_s": ours[True][1], "torch_forward_s": theirs_fwd_s, "sample_speedup": theirs_fwd_s / ours[True][1],
          "ours_unrolled_train_s": ours[False][0], "ours_unrolled_forward_s": ours[False][1],
          "train_speedup_unrolled": theirs_train_s / ours[False][0], "sample_speedup_unrolled": theirs_fwd_s / ours[False][1],
          "torch": torch.__version__}


def llm_vs_transformers(hidden=512, layers_=8, heads=8, kv_heads=4, inter=1536, vocab=32000, batch=8, seq=128,
                        reps=5) -> dict:
  import torch
  import transformers
  from lidit_jax.convert import hf_text
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers_, num_attention_heads=heads,
                                 num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                                 max_position_embeddings=4 * seq)
  ref = transformers.LlamaModel(cfg).float().eval()
  ids = np.random.default_rng(0).integers(0, vocab, (batch, seq))
  mask = np.ones((batch, seq), np.int64)
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    module, params = hf_text.load_hf_text_model(d, jnp.float32)
  module = module.clone(output_layer=-1)  # the last hidden state, as LlamaModel returns
  fwd = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))
  ji, jm = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  fwd(params, ji, jm).block_until_ready()
  ours_s = _median_time(lambda: fwd(params, ji, jm).block_until_ready(), reps)
  ti, tm = torch.from_numpy(ids), torch.from_numpy(mask)

  def theirs():
    with torch.no_grad():
      ref(input_ids=ti, attention_mask=tm)

  theirs()
  theirs_s = _median_time(theirs, reps)
  tokens = batch * seq
  return {"hidden": hidden, "layers": layers_, "batch": batch, "seq": seq, "ours_tokens_per_s": tokens / ours_s,
          "torch_tokens_per_s": tokens / theirs_s, "speedup": theirs_s / ours_s}
