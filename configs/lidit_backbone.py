"""LI-DiT's refiners on a pretrained LLM-conditioned DiT: Sana's or Lumina 2's transformer from its pipeline folder,
its Gemma-2 tower and a second LLM fused by LI-DiT's token refiners and collaborative refiner
(`conditioner.kind=refiners`, options in `model.refiner`) in place of the pipeline's identity conditioner, so that
LI-DiT's claim (two LLMs refined and fused beat one LLM's raw states) can be tested on a pretrained backbone instead
of from scratch.

  python -m lidit_jax.train --config configs/lidit_backbone.py:sana,checkpoints/sana,checkpoints/llama3-8b \
      --workdir runs/lidit_sana --config.data.name=mydata --config.data.data_dir=data

The argument is FAMILY[,PIPELINE[,LLM]]: `sana` or `lumina2`; the pipeline folder (default checkpoints/FAMILY,
diffusers' or converted: the rest is configs/FAMILY.py's fine-tuning recipe); the second LLM (a Hugging Face or
converted directory, default checkpoints/llm; LLaMA3-8B's layout for planning without it), read at its third-to-last
layer behind LI-DiT's instruction, as LI-DiT reads its towers. Everything trains from the pipeline's weights but the
refiners, which start fresh; the refined context (the instruction's tokens dropped) replaces the Gemma states the
transformer's caption projection read. Lumina 2's positions hold fewer than 300 caption tokens, so there the two
towers share them (192 + 96). The same run with `--config.conditioner.kind=identity --config.text.use=gemma` is the
one-LLM baseline. Expected: no numbers measured here (no weights or data on this CPU).
"""
import os

from lidit_jax import configs, prompt

FAMILIES = ("sana", "lumina2")


def get_config(arg: str = "sana"):
  family, pipeline, llm = (arg.split(",") + ["", ""])[:3]
  if family not in FAMILIES:
    raise ValueError(f"configs/lidit_backbone.py:{arg}: the family {family!r} is not one of {FAMILIES}. Fix: "
                     "configs/lidit_backbone.py:sana[,PIPELINE[,LLM]]")
  recipe = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{family}.py")
  c = configs.load_config_file(f"{recipe}:{pipeline or f'checkpoints/{family}'}")
  c.conditioner.kind = "refiners"
  c.model.refiner.update(depth=2, num_heads=16, fusion="collaborative")
  c.text.towers["llm"] = configs.tower(
      init=llm or "checkpoints/llm", instruction=prompt.LIDIT_INSTRUCTION, layer=-3, dtype="bfloat16",
      max_length=256, vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
      intermediate_size=14336, rope_theta=500000.0)  # LLaMA3-8B's layout until the directory exists
  c.text.use = "gemma,llm"
  if family == "lumina2":
    c.text.towers.gemma.max_length, c.text.towers.llm.max_length = 192, 96
  return c
