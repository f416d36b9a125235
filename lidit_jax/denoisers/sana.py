"""Sana (`model.family=sana`, options in `sana`, named as diffusers' SanaTransformer2DModel config): a conditioner's
context (the pipeline's Gemma-2 states, conditioner identity, in its configs) through the caption projection into
the linear-attention DiT (`models/sana.py`). The denoiser family contract is in `denoisers/__init__`.

Rectified flow in the objective's convention (x_t = (1 - t) x0 + t eps, the network predicts eps - x0: Sana's
flow_prediction); the contract's time in [0, 1] is scaled by `sana.time_scale` (1000: diffusers' timesteps).
"""
from __future__ import annotations

import os
import types
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lidit_jax import conditioners, denoisers
from lidit_jax.config_checks import fail, tower
from lidit_jax.convert import diffusers_dc_ae, diffusers_sana, hf_llm, registry
from lidit_jax.denoisers import diffusers_folder as folder, lidit
from lidit_jax.models import sana as sana_lib

Dtype = Any
CLASS = "SanaTransformer2DModel"

# LoRA by default: the blocks' attention projections (diffusers' Sana LoRA scripts: to_q / to_k / to_v / to_out.0)
LORA_TARGETS = (r"^denoiser/blocks/(cross_attn/)?(query|key|value|out)/kernel$",)
# Sana_1600M_1024px's transformer; a pipeline folder's own replaces it (`pipeline_config`)
CONFIG_DEFAULTS = {"sana": dict(
    num_attention_heads=70, attention_head_dim=32, num_layers=20, num_cross_attention_heads=20,
    cross_attention_head_dim=112, caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32,
    patch_size=1, interpolation_scale=0.0,  # > 0: sin-cos positions (Sana 4K); 0: none
    time_scale=1000.0)}  # the embedder's timesteps for the contract's t in [0, 1]


class Sana(nn.Module):
  """The transformer reading a conditioner's context; `drop_B` swaps in the null context (CFG: conditioner.null)."""
  net: sana_lib.SanaConfig
  conditioner: nn.Module
  time_scale: float = 1000.0
  dtype: Dtype = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  null: str = "learned"

  @nn.compact
  def __call__(self, x_BHWC, t_B, feats, valids, prompts, drop_B=None):
    net = sana_lib.SanaTransformer(self.net, self.dtype, self.attention, self.remat, name="denoiser")
    t_emb = net.time(t_B * self.time_scale)
    out = conditioners.outputs(self.conditioner(feats, valids, prompts, t_emb))
    ctx, ctx_valid = conditioners.null_context(self, out.context, out.valid, drop_B, self.null)
    return net(x_BHWC, t_emb, ctx, ctx_valid)


def net_config(p, latent_hwc: tuple[int, int, int]) -> sana_lib.SanaConfig:
  c = latent_hwc[2]
  return sana_lib.SanaConfig(
      in_channels=c, out_channels=c, num_attention_heads=p.num_attention_heads, attention_head_dim=p.attention_head_dim,
      num_layers=p.num_layers, num_cross_attention_heads=p.num_cross_attention_heads,
      cross_attention_head_dim=p.cross_attention_head_dim, caption_channels=p.caption_channels,
      mlp_ratio=float(p.mlp_ratio), attention_bias=bool(p.attention_bias), sample_size=p.sample_size,
      patch_size=p.patch_size, interpolation_scale=float(p.interpolation_scale))


def build(p, shared, conditioner: nn.Module, attention: str) -> Sana:
  return Sana(net_config(p, shared.latent_hwc), conditioner, float(p.time_scale), jnp.dtype(shared.dtype), attention,
              shared.remat, shared.null)


def geometry(p, latent_hwc: tuple[int, int, int]):
  return lidit.patch_geometry(latent_hwc, p.patch_size, p.caption_channels)


def abstract_inputs(batch: int, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]]) -> dict:
  return lidit.abstract_inputs(batch, latent_hwc, text_shapes)  # the same call signature


def flops_per_example(p, shared, text_shapes, conditioner=None, conditioner_flops=0) -> dict:
  """2 x (matmul weights x tokens they see) per block: linear self-attention (q, k, v, out; K^T V and Q (K^T V)
  per head: linear in the tokens), cross-attention (q, out on image tokens; k, v on text tokens; scores), the GLU
  MBConv (1 x 1 to twice the hidden width, depthwise 3 x 3, 1 x 1 back); the caption projection."""
  t, s = lidit.image_tokens(shared.latent_hwc, p.patch_size), sum(shape[0] for shape in text_shapes)
  d, f = p.num_attention_heads * p.attention_head_dim, int(p.num_attention_heads * p.attention_head_dim * p.mlp_ratio)
  dc = p.num_cross_attention_heads * p.cross_attention_head_dim
  per_block = (2 * t * 4 * d * d + 2 * 2 * t * d * p.attention_head_dim  # linear self-attention
               + 2 * t * 2 * d * dc + 2 * s * 2 * d * dc + 4 * t * s * dc  # cross-attention
               + 2 * t * (d * 2 * f + 9 * 2 * f + f * d))  # GLU MBConv
  return {"dit": p.num_layers * per_block, "caption projection": 2 * s * (p.caption_channels * d + d * d)}


# Per block and token, in float32 vectors of the width, what Sana's train step keeps without remat (its GLU-MBConv
# and linear attention keep more than LI-DiT's MLP): Sana 1.6 B's compiled step (1024 px, 4 examples per chip, 2
# against 6 blocks, the slope less the blocks' gradients; benchmarks/RESULTS.md, 2026-12-07). The remat policies'
# figures are LI-DiT's (not measured for Sana).
KEPT_PER_TOKEN = {**lidit.KEPT_PER_TOKEN, "none": 62.0}
WORKING_BLOCKS = 1.0


def activation_bytes(p, shared, batch: int, text_shapes, tensor: int, itemsize: int, attention: str) -> int:
  """Sana's calibrated count in the DiT's form (`denoisers/lidit.py`); its linear self-attention keeps no token x
  token scores, its cross-attention those of its kernel."""
  dit = types.SimpleNamespace(width=p.num_attention_heads * p.attention_head_dim, depth=p.num_layers,
                              num_heads=p.num_attention_heads, patch_size=p.patch_size, mlp_ratio=2 * p.mlp_ratio)
  return lidit.activation_bytes(dit, shared, batch, text_shapes, tensor, itemsize, attention, KEPT_PER_TOKEN,
                                WORKING_BLOCKS, "linear")


def param_groups(params) -> dict:
  rest = {k: v for k, v in params.items() if k not in ("denoiser", "conditioner")}
  return {"denoiser (Sana)": params["denoiser"], "conditioner": params.get("conditioner", {}), "embeddings": rest}


def validate(p, latent_hwc: tuple[int, int, int]) -> None:
  """The `sana` section's checks, each a ConfigError naming value and fix."""
  width = p.num_attention_heads * p.attention_head_dim
  if p.interpolation_scale and width % 4:
    fail("sana.interpolation_scale", p.interpolation_scale, f"sin-cos positions take a width divisible by 4, not "
         f"{width}", "use 0 (no positions, Sana 1.0) or a width divisible by 4")
  if p.patch_size < 1:
    fail("sana.patch_size", p.patch_size, "must be at least 1", "use 1 (Sana's)")


def pretrained_weights(p, shared, path: str) -> dict:
  """{"denoiser/...": array} of a Sana transformer (diffusers' folder, a pipeline folder, or converted) for
  `model.init`. Its layout must be the config's `sana` section (a mismatch is refused by field)."""
  module, params = diffusers_sana.load(path, jnp.dtype(shared.dtype))
  return folder.denoiser_weights(path, "transformer", "sana", module.cfg, net_config(p, shared.latent_hwc), params)


def sample_latent_shape(p, shared, height: int, width: int) -> tuple[int, int, int]:
  """Any size whose latents the patches tile (the convolutions are the positions; sin-cos ones interpolate)."""
  unit = p.patch_size * shared.pixel_factor
  if height % unit or width % unit:
    raise ValueError(f"height x width {height} x {width} must be multiples of {unit}. Fix: round them")
  return (height // shared.pixel_factor, width // shared.pixel_factor, shared.latent_hwc[2])


# ---- a diffusers Sana pipeline folder as a config: Pipeline.from_pretrained(folder), configs/sana.py ----

# The text tower's architecture for planning before the folder exists (text.towers.gemma.plan_arch): Gemma-2-2B-it
GEMMA2_2B = dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                 num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                 query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)
# SanaPipeline's default complex_human_instruction, joined by new lines; the prompt follows it directly
INSTRUCTION = "\n".join([
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: "])


def is_pipeline_folder(path: str) -> bool:
  """A Sana pipeline folder (diffusers' or converted): model_index.json naming a SanaTransformer2DModel."""
  return folder.holds(path, "transformer", CLASS)


def pipeline_config(c, path: str, planned: bool = False):
  """The config that samples a Sana pipeline folder (diffusers' or converted) as diffusers' SanaPipeline does
  (its resolution bins by the transformer's sample_size: 16 -> 512 px, .., 128 -> 4096), and that
  configs/sana.py fine-tunes:
  the transformer from its transformer/ (model.init), the text side the pipeline's (Gemma-2's last state over the
  complex human instruction joined to the lower-cased prompt, the first token and the last 299 kept; negative
  prompts and the empty prompt that guides by default without the instruction, 300 tokens), its DC-AE, image
  size, flow scheduler (its shift trains too; logit-normal times) and guidance default (4.5; 20 steps). None
  when `path` is no Sana folder, unless `planned`: a folder that does not exist yet keeps Sana 1600M 1024's
  layout (planning before converting)."""
  if not planned and not is_pipeline_folder(path):
    return None
  c.model.update(family="sana", dtype="bfloat16", init=path)
  c.conditioner.update(kind="identity", null="empty_prompt")
  c.text.use = "gemma"
  c.text.towers = {"gemma": tower(
      init=os.path.join(path, "text_encoder"), tokenizer=os.path.join(path, "tokenizer"), layer=-1, lowercase=True,
      instruction=INSTRUCTION, separator="", selection="first_and_last", instruct_negatives=False, max_length=300,
      dtype="bfloat16", plan_arch=GEMMA2_2B)}
  c.text.update(instruction="", use_chat_template=False)
  c.autoencoder.update(kind="dc_ae", factor=32, channels=32, dtype="float32", path=path)
  c.objective.kind = "rectified_flow"
  c.flow.update(timestep="logit_normal", logit_mean=0.0, logit_std=1.0, shift=3.0)  # Sana's training
  c.data.image_size = 1024
  c.sample.update(steps=20, sampler="dpmpp_2m", cfg=4.5, shift=3.0, resolution_bins=1024)
  c.mesh.data = -1  # data parallel over every device
  if not os.path.isdir(path):
    return c
  net = registry.component_config("diffusers_sana", path, "transformer", CLASS)
  ae = folder.read_autoencoder(c, path, "dc_ae")
  folder.read_flow_scheduler(c, path)
  c.sana = {**c.sana.to_dict(), **{k: getattr(net, k) for k in c.sana if hasattr(net, k)}}
  c.data.image_size = net.sample_size * ae.downsample_factor
  c.sample.resolution_bins = folder.bin_base(net.sample_size * 32, (512, 1024, 2048, 4096))
  c.sana.time_scale = float(c.flow.num_train_timesteps)
  return c


# ---- back to a diffusers pipeline folder (python -m lidit_jax.export diffusers) ----

def exportable(config, where: str) -> str:
  """The source pipeline folder of a model diffusers' Sana pipelines run (their own text encoder, guided by the empty
  prompt); anything else is refused by name."""
  return folder.exportable(config, where, is_pipeline_folder)


def export_pipeline(backend, out: str, save) -> None:
  """Write the model into the (new) folder `out` as a diffusers Sana pipeline folder: its transformer, autoencoder
  and text encoder (as the backend holds them), the source's tokenizer, scheduler config and options."""
  config = backend.setup.config
  net = net_config(config.sana, denoisers.latent_hwc(config))
  folder.export_transformer_pipeline(backend, out, save, exportable(config, out),
                                     (CLASS, lambda params: diffusers_sana.to_diffusers(net, params)),
                                     ("gemma", hf_llm, "Gemma2Model", "configs/sana.py"))


def lora_names(p, shared):
  """(path, layer) -> the module names LoRA files give a kernel: diffusers' (`transformer.` + its state-dict
  module, as Sana LoRA scripts save: `transformer.transformer_blocks.0.attn1.to_q`)."""
  return folder.lora_names(diffusers_sana.plan(net_config(p, shared.latent_hwc)))


def pipeline_parts(src: str, dtype) -> dict | None:
  """{component: (conversion family, checked conversion)} of a Sana pipeline folder for `convert diffusers`
  (None for another folder)."""
  if not is_pipeline_folder(src):
    return None
  return folder.transformer_parts(src, dtype, diffusers_sana, diffusers_dc_ae, hf_llm)


def lora_tower_prefixes(config) -> dict:
  """No text encoder LoRA: Sana's LoRAs train the transformer only."""
  return {}
