"""LI-DiT-1B (paper Table 7): DiT 28 x 1152, 16 heads, patch 2, 256 px, 8x VAE with 16 latent channels,
LLaMA3-8B + Qwen1.5-7B text towers (frozen, bf16), 2-block token refiners + collaborative refiner.

Parameter counts without allocating anything:
  python -m lidit_jax.model --config configs/lidit_1b.py
The towers read local checkpoints: download the Hugging Face models yourself (meta-llama/Meta-Llama-3-8B,
Qwen/Qwen1.5-7B), convert once with `python -m lidit_jax.convert hf-text SRC checkpoints/llama3-8b` (or point
init at the Hugging Face directory itself), or override `--config.text.towers.llama3.init=DIR`. Their
architecture then comes from the checkpoint; the fields below only serve parameter counts without one.
Training works in the latent space of a 16-channel 8x VAE (SD3's; FLUX.1's with its config.json): point
`--config.autoencoder.path` at a diffusers VAE or pipeline folder, an original single file, or the output of
`python -m lidit_jax.convert vae SRC OUT`. Paper: batch 2048, 500k iterations, 30M pairs; GenEval 0.60,
DPG-Bench 81.65.

`configs/lidit_1b.py:tiny` is the same recipe shrunk until it trains on this CPU in seconds (random towers, a
tiny random VAE), for tests and for trying the latent-space path end to end:
  python -m lidit_jax.convert.tiny_models checkpoints/tiny --vae
  python -m lidit_jax.train --config configs/lidit_1b.py:tiny --workdir runs/lidit_1b_tiny
"""
from lidit_jax import configs
from lidit_jax.data import shapes


def llama3_8b():
  return configs.tower(init="checkpoints/llama3-8b", vocab_size=128256,
                       hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                       rope_theta=500000.0, max_length=256)


def qwen15_7b():
  return configs.tower(init="checkpoints/qwen1.5-7b", vocab_size=151936,
                       hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008,
                       rope_theta=1000000.0, max_length=256)


def get_config(variant: str = ""):
  c = configs.base_config()
  c.model.update(width=1152, depth=28, num_heads=16, patch_size=2, pos_embed="resblock", dtype="bfloat16",
                 remat="dots_no_batch")
  c.model.refiner.update(depth=2, num_heads=16, fusion="collaborative")
  c.text.update(use="llama3,qwen15", towers=dict(llama3=llama3_8b(), qwen15=qwen15_7b()))
  c.data.update(image_size=256)
  c.autoencoder.update(kind="vae", factor=8, channels=16, path="checkpoints/sd3-vae", dtype="bfloat16")
  c.optim.update(lr=1e-4, warmup_steps=5000, ema_decay=0.9999)
  c.train.update(num_steps=500_000, batch_size=2048, log_every=100, checkpoint_every=2000, sample_every=10_000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  if variant == "tiny":
    c.model.update(width=32, depth=2, num_heads=2, dtype="float32", remat="none")
    c.model.refiner.update(depth=1, num_heads=2)
    tiny = dict(init="random", tokenizer="", vocab_size=0, hidden_size=32, num_layers=3, num_heads=2,
                num_kv_heads=1, intermediate_size=64, rope_theta=10000.0, max_length=56, dtype="float32")
    for t in c.text.towers.values():
      t.update(tiny)
    c.text.words = shapes.VOCABULARY  # random towers read the demo's captions with the word tokenizer
    c.data.update(image_size=32)
    c.autoencoder.update(path="checkpoints/tiny/vae", factor=2, channels=4, dtype="float32")
    c.optim.update(lr=1e-3, warmup_steps=2, ema_decay=0.99)
    c.train.update(num_steps=6, batch_size=4, log_every=2, checkpoint_every=3, sample_every=6)
    c.sample.update(steps=3, num_images=2)
    c.eval.update(num_prompts=4, steps=3, batch_size=4, probe_pairs=2)
    c.mesh.update(fsdp=1)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/lidit_1b.py; use tiny")
  return c
