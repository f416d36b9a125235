"""Fine-tune PixArt-Sigma (or PixArt-alpha): the transformer trains; its T5 encoder and the VAE stay frozen.

  python -m lidit_jax.convert diffusers PixArt-Sigma-XL-2-1024-MS checkpoints/pixart_sigma   # once
  python -m lidit_jax.data.prepare --src IMAGES --out data --name mydata                     # captioned images
  python -m lidit_jax.train --config configs/pixart_sigma.py:checkpoints/pixart_sigma --workdir runs/pixart \
      --config.data.name=mydata --config.data.data_dir=data
  python -m lidit_jax.sample --workdir runs/pixart --prompt "a photo of a cat" --out cat.png
  python -m lidit_jax.export diffusers runs/pixart pixart-finetuned                          # diffusers' folder

The argument after the colon is the pipeline folder, diffusers' own or converted (default
checkpoints/pixart_sigma). The transformer starts from its transformer/ (model.init); the text side is the
pipeline's: text_encoder/ + tokenizer/, the lower-cased prompt in 300 T5 tokens (alpha: 120), padding masked, the
encoder's last state read as the context itself (conditioner identity: the transformer's caption projection is
its own); vae/ encodes the images. The transformer's layout, the VAE, the image size and the DDPM section with the
sampler come from the folder's JSON (lidit_jax/denoisers/pixart.py); without the folder, PixArt-Sigma 1024's.
Training as PixArt's: epsilon prediction over uniform timesteps of the linear schedule (the learned variance is not
trained: diffusers' pipelines never read it), AdamW at 2e-5 with weight decay 0.03 and gradients clipped at 0.01,
EMA 0.9999; captions dropped to the empty prompt (which the pipeline guides with) 10 % of the time. `export
diffusers` gives a folder diffusers' PixArtSigmaPipeline samples to the same images (tests/test_pixart.py).
LoRA: --config.lora.rank=16 (the blocks' attention, docs/lora.md). Expected: no numbers measured here (no PixArt
weights or data on this CPU).
"""
from lidit_jax import configs
from lidit_jax.denoisers import pixart

DEFAULT = "checkpoints/pixart_sigma"


def get_config(path: str = DEFAULT):
  # the model: the folder's transformer layout, T5 side, VAE, image size and scheduler; data parallel over every
  # device (0.6 B parameters fit each; --config.mesh.fsdp=-1 --config.mesh.data=1 shards them)
  sigma = None if pixart.is_pipeline_folder(path) else True  # the folder says (alpha or Sigma); none yet: Sigma
  c = pixart.pipeline_config(configs.base_config(), path, sigma)
  c.data.update(source="tfds", caption_dropout=0.1)
  c.optim.update(lr=2e-5, warmup_steps=1000, min_lr_ratio=1.0, weight_decay=0.03, grad_clip=0.01, ema_decay=0.9999)
  c.train.update(num_steps=10_000, batch_size=64, log_every=50, checkpoint_every=1000, sample_every=1000)
  c.sample.update(num_images=4, prompts=("a photograph of an astronaut riding a horse", "a red apple on a wooden table",
                                         "a watercolor painting of a lighthouse at dusk", "a corgi wearing sunglasses"))
  return c

