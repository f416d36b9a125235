"""Write tiny random Hugging Face LLM checkpoints for the shapes demo: no download, no torch.

  python -m lidit_jax.convert.tiny_models checkpoints/tiny [--convert]

writes `llama/` (a Llama-3-style model: GQA, llama3 RoPE scaling) and `qwen2/` (q/k/v biases) in the
Hugging Face layout (config.json, model.safetensors, the demo's word tokenizer with a chat template).
transformers' own classes load them. With --convert each is also converted to `llama-orbax/` and
`qwen2-orbax/`. Then `--config configs/shapes.py:hf` trains the demo on them. With --vae, `vae/` is a tiny
random diffusers AutoencoderKL (a 2x latent space, for tests of latent-space training).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
import transformers
from safetensors.numpy import save_file

from lidit_jax import cli, prompt as prompt_lib
from lidit_jax.convert import diffusers_vae, __main__ as convert_cli
from lidit_jax.data import shapes
from lidit_jax.models import vae

ARCHS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5,
                  max_position_embeddings=128, tie_word_embeddings=True,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=32), rope_theta=500000.0),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-6,
                  max_position_embeddings=128, rope_theta=1000000.0),
}


def write_tiny_model(out: str, arch: str, seed: int = 0) -> str:
  """A random `arch` model (see ARCHS) in the Hugging Face layout, tokenizer included."""
  os.makedirs(out, exist_ok=True)
  tok = prompt_lib.build_word_tokenizer(shapes.VOCABULARY, out_dir=out)
  spec = dict(ARCHS[arch])
  model_type = spec.pop("model_type")
  cfg = transformers.AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec)
  cfg.save_pretrained(out)
  rng = np.random.default_rng(seed)
  d, h, g = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
  k = d // h
  shapes_ = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    shapes_.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                    p + "self_attn.q_proj.weight": (h * k, d), p + "self_attn.k_proj.weight": (g * k, d),
                    p + "self_attn.v_proj.weight": (g * k, d), p + "self_attn.o_proj.weight": (d, h * k),
                    p + "mlp.gate_proj.weight": (cfg.intermediate_size, d),
                    p + "mlp.up_proj.weight": (cfg.intermediate_size, d),
                    p + "mlp.down_proj.weight": (d, cfg.intermediate_size)})
    if model_type == "qwen2":
      shapes_.update({p + "self_attn.q_proj.bias": (h * k,), p + "self_attn.k_proj.bias": (g * k,),
                      p + "self_attn.v_proj.bias": (g * k,)})
  tensors = {}
  for name, shape in sorted(shapes_.items()):
    if name.endswith("norm.weight"):
      tensors[name] = np.ones(shape, np.float32)
    else:  # the scale of a trained LLM's weights, roughly: unit-ish activations through the stack
      std = 1.0 if "embed_tokens" in name else 1.0 / np.sqrt(shape[-1])
      tensors[name] = (rng.standard_normal(shape) * std).astype(np.float32)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  return out


TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


def write_tiny_vae(out: str, seed: int = 0, **overrides) -> str:
  """A random diffusers AutoencoderKL folder (TINY_VAE's layout: 2x down, 4 latent channels), from our own
  module's initialisation; diffusers' AutoencoderKL loads it (tests/test_vae_parity.py)."""
  cfg = vae.VAEConfig(**{**TINY_VAE, **overrides})
  module = vae.AutoencoderKL(cfg)
  size = 8 * cfg.downsample_factor
  params = module.init(jax.random.key(seed), jax.numpy.zeros((1, size, size, cfg.in_channels)))["params"]
  return diffusers_vae.write_diffusers(out, cfg, params)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lidit_jax.convert.tiny_models", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out", help="directory to hold llama/ and qwen2/ (and their converted copies)")
  parser.add_argument("--convert", action="store_true", help="also write <arch>-orbax/ converted copies")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--vae", action="store_true", help="also write vae/, a tiny random diffusers AutoencoderKL")
  cli.add_debug_flag(parser)
  args = parser.parse_args(argv)
  written = {}
  for i, arch in enumerate(ARCHS):
    with cli.user_errors():
      written[arch] = write_tiny_model(os.path.join(args.out, arch), arch, seed=args.seed + i)
    if args.convert:
      out = os.path.join(args.out, f"{arch}-orbax")
      if convert_cli.main(["hf-text", written[arch], out, "--dtype", "float32"]):
        return 2
      written[f"{arch}-orbax"] = out
  if args.vae:
    with cli.user_errors():
      written["vae"] = write_tiny_vae(os.path.join(args.out, "vae"), seed=args.seed)
  print(json.dumps(written))
  return 0


if __name__ == "__main__":
  sys.exit(main())
