"""Fine-tune Sana (0.6 B / 1.6 B): the transformer trains; its Gemma-2 encoder and the DC-AE stay frozen.

  python -m lidit_jax.convert diffusers Sana_1600M_1024px_diffusers checkpoints/sana   # once
  python -m lidit_jax.data.prepare --src IMAGES --out data --name mydata               # captioned images
  python -m lidit_jax.train --config configs/sana.py:checkpoints/sana --workdir runs/sana \
      --config.data.name=mydata --config.data.data_dir=data
  python -m lidit_jax.sample --workdir runs/sana --prompt "a photo of a cat" --out cat.png
  python -m lidit_jax.export diffusers runs/sana sana-finetuned                       # diffusers' folder

The argument after the colon is the pipeline folder, diffusers' own or converted (default checkpoints/sana). The
transformer starts from its transformer/ (model.init); the text side is the pipeline's: Gemma-2's last state over
the complex human instruction joined to the lower-cased prompt, the first token and the last 299 kept (negative
prompts and the empty prompt without the instruction); vae/ (the 32x DC-AE) encodes the images. The layout, the
image size and the flow scheduler with its shift come from the folder's JSON (lidit_jax/denoisers/sana.py);
without the folder, Sana 1600M 1024's. Training as Sana's: flow matching over logit-normal times shifted by the
scheduler's flow_shift (3 at 1024), gradients clipped at 0.1, no weight decay; AdamW stands in for Sana's CAME
(not in optax). Captions dropped to the empty prompt 10 % of the time. `export diffusers` gives a folder diffusers'
SanaPipeline samples to the same images (tests/test_sana.py). LoRA: --config.lora.rank=16 (the blocks' attention,
docs/lora.md). Expected: no numbers measured here (no Sana weights or data on this CPU).
"""
from lidit_jax import configs
from lidit_jax.denoisers import sana

DEFAULT = "checkpoints/sana"


def get_config(path: str = DEFAULT):
  # the model: the folder's transformer layout, Gemma side, DC-AE, image size and scheduler; data parallel over every
  # device (1.6 B parameters fit each; --config.mesh.fsdp=-1 --config.mesh.data=1 shards them)
  c = sana.pipeline_config(configs.base_config(), path, planned=True)
  c.data.update(source="tfds", caption_dropout=0.1)
  c.optim.update(lr=1e-5, warmup_steps=1000, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=0.1, ema_decay=0.9999)
  c.train.update(num_steps=10_000, batch_size=64, log_every=50, checkpoint_every=1000, sample_every=1000)
  c.sample.update(num_images=4, prompts=("a photograph of an astronaut riding a horse", "a red apple on a wooden table",
                                         "a watercolor painting of a lighthouse at dusk", "a corgi wearing sunglasses"))
  return c
