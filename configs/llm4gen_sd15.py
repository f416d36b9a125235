"""LLM4GEN on Stable Diffusion 1.5: its Cross-Adapter Module fuses a T5-XL encoder's features with SD's CLIP ones.

  # ROOT (default checkpoints/llm4gen) holds: sd15/ (the SD 1.5 pipeline folder, diffusers' or converted),
  # unet/ (LLM4GEN's fine-tuned U-Net, a diffusers folder), projector.safetensors (the CAM; or point
  # --config.conditioner.cam.init at projector.pth with --config.conditioner.cam.allow_pickle=True) and t5/ (the
  # T5-XL encoder, e.g. RankGen's: a key prefix such as `t5_encoder.` is accepted; with t5-v1_1-xl's tokenizer)
  python -c "from lidit_jax.pipeline import Pipeline; Pipeline.from_pretrained('configs/llm4gen_sd15.py')(['a cat'])"
  python -m lidit_jax.train --config configs/llm4gen_sd15.py:ROOT --workdir runs/llm4gen \
      --config.data.name=mydata --config.data.data_dir=data          # trains the CAM; the U-Net too: train.freeze=()

The released inference, as facts (PAPERS.md section 4): the T5 side reads "pre " + prompt, 256 tokens padded with
id 0 (masked in the encoder), the encoder's last hidden state; the CLIP side is SD 1.5's (77 tokens, last hidden
state); the context is the CAM's: 77 CLIP tokens then 256 refined T5 tokens, unmasked; the unconditional context is
the CAM of the empty prompt (conditioner.null=empty_prompt); PNDM, 50 steps, guidance 7.5. Everything else is
configs/sd15.py's. `Pipeline.from_pretrained` on this config samples without training (the U-Net from unet/, the
CAM from the projector); tests/test_llm4gen.py checks it image for image against diffusers given the reference
CAM's prompt embeds, on tiny models.
"""
import os

from lidit_jax import configs

DEFAULT = "checkpoints/llm4gen"


# RankGen's T5-XL encoder (t5-v1_1-xl sizes), for `plan` before the checkpoint is converted
T5_XL = dict(model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
             feed_forward_proj="gated-gelu")


def get_config(root: str = DEFAULT):
  here = os.path.dirname(os.path.abspath(__file__))
  c = configs.load_config_file(f"{os.path.join(here, 'sd15.py')}:{os.path.join(root, 'sd15')}")
  c.model.init = os.path.join(root, "unet")  # LLM4GEN's fine-tuned U-Net (SD 1.5's layout)
  c.conditioner.update(kind="llm4gen", null="empty_prompt")
  c.conditioner.cam.update(clip="clip", llm="t5", init=os.path.join(root, "projector.safetensors"))
  c.text.use = "clip,t5"
  t5 = os.path.join(root, "t5")
  c.text.towers.t5 = configs.tower(init=t5, tokenizer=t5, layer=-1, max_length=256, instruction="pre",
                                   dtype="bfloat16", plan_arch=T5_XL)
  c.train.freeze = ("denoiser/",)  # the CAM trains; --config.train.freeze="()" trains the U-Net as well
  return c
