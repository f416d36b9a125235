"""LI-DiT-10B (paper Table 7): DiT 48 x 2816, 44 heads, patch 2, 512 px then 1024 px, same text side
as LI-DiT-1B (LLaMA3-8B + Qwen1.5-7B, frozen, bf16).

  python -m lidit_jax.model --config configs/lidit_10b.py
Paper: batch 4096, over 1M iterations, over 1B pairs; GenEval 0.76, DPG-Bench 84.60.
`configs/lidit_10b.py:1024` is the high-resolution stage.
"""
import os

from lidit_jax import configs


def get_config(variant: str = ""):
  c = configs.load_config_file(os.path.join(os.path.dirname(__file__), "lidit_1b.py"))
  if variant not in ("", "1024"):
    raise ValueError(f"unknown variant {variant!r} of configs/lidit_10b.py; use '' (512 px) or '1024'")
  c.model.update(width=2816, depth=48, num_heads=44)
  c.model.refiner.num_heads = 44
  c.data.image_size = 1024 if variant == "1024" else 512
  c.train.update(num_steps=1_000_000, batch_size=4096)
  return c
