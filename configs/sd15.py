"""Fine-tune Stable Diffusion 1.x / 2.x: the U-Net trains; its CLIP text encoder and VAE stay frozen.

  python -m lidit_jax.convert diffusers stable-diffusion-v1-5 checkpoints/sd15      # once (or: convert single-file)
  python -m lidit_jax.data.prepare --src IMAGES --out data --name mydata             # captioned images -> ArrayRecord
  python -m lidit_jax.train --config configs/sd15.py:checkpoints/sd15 --workdir runs/sd15 \
      --config.data.name=mydata --config.data.data_dir=data
  python -m lidit_jax.sample --workdir runs/sd15 --prompt "a photo of a cat" --negative_prompt "blurry" --out cat.png
  python -m lidit_jax.export diffusers runs/sd15 sd15-finetuned                      # or OUT.safetensors --format single-file

The argument after the colon is the pipeline folder, diffusers' own or converted (default checkpoints/sd15). The
U-Net starts from its unet/ (model.init); the text side is the pipeline's: text_encoder/ + tokenizer/, 77 CLIP
tokens padded with the tokenizer's pad token, no padding mask, the final LayerNorm on the last layer (SD 1.x /
2.x's prompt_embeds), read as the context itself (conditioner identity); vae/ encodes the images. The U-Net layout,
the VAE's factor and channels, the image size (unet sample_size x the VAE's factor) and the DDPM section with the
sampler come from the folder's JSON configs (no weights are read here); without the folder, SD 1.5's values.
Caption dropout trains on the empty prompt, which sampling guides with (or a negative prompt), as diffusers'
pipelines do, so `export diffusers` gives a pipeline that diffusers samples to the same images (tested on a tiny
pipeline: tests/test_sd_finetune.py). Expected: no numbers measured here (no SD 1.5 weights or data on this CPU).
"""
from lidit_jax import configs
from lidit_jax.denoisers import unet

DEFAULT = "checkpoints/sd15"


def recipe(c):
  """SD fine-tuning on top of a pipeline's config (also configs/sdxl.py's): min-SNR 5, caption dropout to the
  unconditional context, lr 1e-5, EMA."""
  c.ddpm.update(snr_gamma=5.0)  # min-SNR-gamma weights; the rest: the folder's scheduler
  c.data.update(source="tfds", caption_dropout=0.1)
  c.optim.update(lr=1e-5, warmup_steps=500, min_lr_ratio=1.0, weight_decay=1e-2, grad_clip=1.0, ema_decay=0.9999)
  c.train.update(num_steps=15_000, batch_size=256, log_every=50, checkpoint_every=1000, sample_every=1000)
  c.sample.update(num_images=4, prompts=("a photograph of an astronaut riding a horse", "a red apple on a wooden table",
                                         "a watercolor painting of a lighthouse at dusk", "a corgi wearing sunglasses"))
  return c


def get_config(path: str = DEFAULT):
  # the model: the folder's U-Net layout, text side, VAE, image size and scheduler (lidit_jax/denoisers/unet.py);
  # data parallel over every device (SD 1.5's 860 M parameters fit each)
  return recipe(unet.pipeline_config(configs.base_config(), path, xl=False))
