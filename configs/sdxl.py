"""Fine-tune Stable Diffusion XL: the U-Net trains; its two CLIP text encoders and the VAE stay frozen.

  python -m lidit_jax.convert diffusers stable-diffusion-xl-base-1.0 checkpoints/sdxl   # once (or: convert single-file)
  python -m lidit_jax.train --config configs/sdxl.py:checkpoints/sdxl --workdir runs/sdxl \
      --config.data.name=mydata --config.data.data_dir=data
  python -m lidit_jax.sample --workdir runs/sdxl --prompt "a photo of a cat" --out cat.png
  python -m lidit_jax.export diffusers runs/sdxl sdxl-finetuned                        # or OUT.safetensors --format single-file

As configs/sd15.py (the argument is the pipeline folder, default checkpoints/sdxl; layout, VAE, image size and
scheduler from its JSON), with SDXL's text side as diffusers' StableDiffusionXLPipeline computes it: both
encoders' penultimate hidden states (no final LayerNorm) side by side as the context (768 + 1280 = 2048), the
second encoder's pooled, projected output as text_embeds (tower `pooled`: the same weights, loaded once, run a
second time for that output), and size / crop ids of an uncropped image of the training size. The unconditional
context is zeros (the pipeline's force_zeros_for_empty_prompt) or a negative prompt's; caption dropout trains on
zeros. Tested end to end on a tiny SDXL-style pipeline (tests/test_sd_finetune.py); no SDXL-size numbers here.
For memory on large slices: --config.mesh.fsdp=-1 --config.mesh.data=1 (parameters sharded), --config.model.remat=full.
"""
import importlib.util
import os

from lidit_jax import configs
from lidit_jax.denoisers import unet

DEFAULT = "checkpoints/sdxl"


def get_config(path: str = DEFAULT):
  # SD 1.x's fine-tuning recipe (configs/sd15.py) on SDXL's model (lidit_jax/denoisers/unet.py: the folder's layout,
  # both encoders and the pooled one, zeros as the unconditional context, SDXL base's values without the folder)
  spec = importlib.util.spec_from_file_location("sd15", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd15.py"))
  sd15 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sd15)
  c = sd15.recipe(unet.pipeline_config(configs.base_config(), path, xl=True))
  c.train.update(num_steps=10_000, batch_size=128)
  return c
