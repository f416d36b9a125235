"""LI-DiT-1B (paper Table 7): DiT 28 x 1152, 16 heads, patch 2, 256 px, 8x VAE with 16 latent channels,
LLaMA3-8B + Qwen1.5-7B text towers (frozen, bf16), 2-block token refiners + collaborative refiner.

Parameter counts without allocating anything:
  python -m lidit_jax.model --config configs/lidit_1b.py
The towers read local checkpoints: download the Hugging Face models yourself (meta-llama/Meta-Llama-3-8B,
Qwen/Qwen1.5-7B), convert once with `python -m lidit_jax.convert hf-text SRC checkpoints/llama3-8b` (or point
init at the Hugging Face directory itself), or override `--config.text.towers.llama3.init=DIR`. Their
architecture then comes from the checkpoint; the fields below only serve parameter counts without one.
Training also needs the VAE (a later issue). Paper: batch 2048, 500k iterations, 30M pairs; GenEval 0.60, DPG-Bench 81.65.
"""
from lidit_jax import configs


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
  c.autoencoder.update(kind="vae", factor=8, channels=16)
  c.optim.update(lr=1e-4, warmup_steps=5000, ema_decay=0.9999)
  c.train.update(num_steps=500_000, batch_size=2048, log_every=100, checkpoint_every=2000, sample_every=10_000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  if variant:
    raise ValueError(f"unknown variant {variant!r} of configs/lidit_1b.py")
  return c
