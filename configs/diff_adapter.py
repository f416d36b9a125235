"""The LLM Diff Adapter on Stable Diffusion 1.5 (Dong et al., "Decoder-Only LLMs are Better Controllers for
Diffusion Models"; no code or weights were released: PAPERS.md section 3 and conditioners/diff_adapter.py give the
readings taken).

  # ROOT (default checkpoints/diff_adapter) holds sd15/ (the SD 1.5 pipeline folder, diffusers' or converted) and
  # llm/ (a decoder-only LLM: a Hugging Face folder or `python -m lidit_jax.convert hf-text` output, with its
  # tokenizer; the paper names none)
  python -m lidit_jax.plan --config configs/diff_adapter.py:ROOT --devices 8     # the towers' all-layer features
  python -m lidit_jax.encode_prompts --config configs/diff_adapter.py:ROOT --out cache/   # scores once, offline
  python -m lidit_jax.train --config configs/diff_adapter.py:ROOT --workdir runs/diff \
      --config.data.name=mydata --config.data.data_dir=data --config.text.cache=cache/

The LLM reads the prompt alone (no instruction, no chat template), 128 tokens; its per-block scores become the code
c; the U-Net's original cross-attentions read phi(c), the new ones c, mixed per layer and the U-Net's own at init.
The original U-Net is frozen: the adapter (g, h, phi), the new attentions and the mixes train (epsilon loss, SD 1.5's
DDPM). The unconditional context is the code of "" (conditioner.null=empty_prompt). Everything else is
configs/sd15.py's.
"""
import os

from lidit_jax import configs

DEFAULT = "checkpoints/diff_adapter"
# what trains: the conditioner, the U-Net's new cross-attentions (attn2_new) and their mixes (attn_mix)
FREEZE_ORIGINAL_UNET = r"^denoiser/(?!.*(attn2_new|attn_mix))"


def get_config(root: str = DEFAULT):
  here = os.path.dirname(os.path.abspath(__file__))
  c = configs.load_config_file(f"{os.path.join(here, 'sd15.py')}:{os.path.join(root, 'sd15')}")
  llm = os.path.join(root, "llm")
  c.text.use = "llm"
  c.text.instruction = ""
  c.text.use_chat_template = False
  # planned (before the LLM exists) as a Llama-3-8B: the paper names no base model
  c.text.towers = {"llm": configs.tower(init=llm, tokenizer=llm, output="scores", alone="diagonal", max_length=128,
                                        dtype="bfloat16", vocab_size=128256, hidden_size=4096, num_layers=32,
                                        num_heads=32, num_kv_heads=8, intermediate_size=14336, rope_theta=500000.0)}
  c.conditioner.update(kind="diff_adapter", null="empty_prompt")
  c.conditioner.diff.llm = "llm"
  c.unet.second_attention = "per_layer"
  c.train.freeze = (FREEZE_ORIGINAL_UNET,)
  return c
