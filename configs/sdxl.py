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
import os

from lidit_jax import configs

DEFAULT = "checkpoints/sdxl"
# OpenCLIP ViT-bigG/14's text side with projection (SDXL's text_encoder_2/), for `plan` before converting
CLIP_BIGG = dict(model_type="clip_text_model", vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                 num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                 projection_dim=1280)


def get_config(path: str = DEFAULT):
  # SD 1.x's fine-tuning recipe (configs/sd15.py), with SDXL's text side, layout and sizes
  c = configs.load_config_file(f"{os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sd15.py')}:{path}")
  # SDXL base's layout and scheduler, replaced by the folder's own when it exists
  c.unet = dict(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), layers_per_block=2, num_heads=(5, 10, 20),
                transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, norm_num_groups=32,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
  c.conditioner.null = "zeros"
  c.text.use = "clip,clip_2,pooled"
  sd_clip = dict(layer=-2, mask_padding=False, max_length=77, dtype="bfloat16")
  c.text.towers = {
      "clip": configs.tower(init=os.path.join(path, "text_encoder"), tokenizer=os.path.join(path, "tokenizer"),
                            plan_arch=c.text.towers.clip.plan_arch, **sd_clip),
      "clip_2": configs.tower(init=os.path.join(path, "text_encoder_2"), tokenizer=os.path.join(path, "tokenizer_2"),
                              plan_arch=CLIP_BIGG, **sd_clip),
      "pooled": configs.tower(init=os.path.join(path, "text_encoder_2"), tokenizer=os.path.join(path, "tokenizer_2"),
                              output="pooled", plan_arch=CLIP_BIGG, **sd_clip)}
  c.data.image_size = 1024
  c.train.update(num_steps=10_000, batch_size=128)
  c.sample.update(sampler="euler", cfg=5.0)
  return configs.from_sd_pipeline(c, path)
