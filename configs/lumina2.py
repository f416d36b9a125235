"""Fine-tune Lumina-Image 2.0: the transformer trains; its Gemma-2 encoder and the VAE stay frozen.

  python -m lidit_jax.convert diffusers Lumina-Image-2.0 checkpoints/lumina2            # once
  python -m lidit_jax.data.prepare --src IMAGES --out data --name mydata                # captioned images
  python -m lidit_jax.train --config configs/lumina2.py:checkpoints/lumina2 --workdir runs/lumina2 \
      --config.data.name=mydata --config.data.data_dir=data
  python -m lidit_jax.sample --workdir runs/lumina2 --prompt "a photo of a cat" --out cat.png
  python -m lidit_jax.export diffusers runs/lumina2 lumina2-finetuned                   # diffusers' folder

The argument after the colon is the pipeline folder, diffusers' own or converted (default checkpoints/lumina2). The
transformer starts from its transformer/ (model.init); the text side is the pipeline's: Gemma-2's second-to-last
state over the system prompt + " <Prompt Start> " + the prompt in 256 tokens, padding masked (negative prompts and
the empty prompt without the system prompt); vae/ (Flux's 16-channel VAE, shifted and scaled latents) encodes the
images. The layout, the image size and the scheduler's shift come from the folder's JSON
(lidit_jax/denoisers/lumina2.py); without the folder, Lumina-Image-2.0's. Training: flow matching over logit-normal
times shifted by the scheduler's shift, AdamW 2e-5 (Lumina 2's fine-tuning rate), gradients clipped at 1, no weight
decay, EMA 0.9999, captions dropped to the empty prompt 10 % of the time. `export diffusers` gives a folder
diffusers' Lumina2Pipeline samples to the same images (tests/test_lumina2.py). LoRA: --config.lora.rank=16 (every
block's attention, docs/lora.md). Expected: no numbers measured here (no Lumina 2 weights or data on this CPU).
"""
from lidit_jax import configs
from lidit_jax.denoisers import lumina2

DEFAULT = "checkpoints/lumina2"


def get_config(path: str = DEFAULT):
  # the model: the folder's transformer layout, Gemma side, VAE, image size and scheduler; data parallel over every
  # device (2.6 B parameters and their Adam state: --config.mesh.fsdp=-1 --config.mesh.data=1 shards them)
  c = lumina2.pipeline_config(configs.base_config(), path, planned=True)
  c.data.update(source="tfds", caption_dropout=0.1)
  c.optim.update(lr=2e-5, warmup_steps=1000, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999)
  c.train.update(num_steps=10_000, batch_size=64, log_every=50, checkpoint_every=1000, sample_every=1000)
  c.sample.update(num_images=4, prompts=("a photograph of an astronaut riding a horse", "a red apple on a wooden table",
                                         "a watercolor painting of a lighthouse at dusk", "a corgi wearing sunglasses"))
  return c
