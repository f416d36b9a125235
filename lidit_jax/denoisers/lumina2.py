"""Lumina-Image 2.0 (`model.family=lumina2`, options in `lumina2`, named as diffusers' Lumina2Transformer2DModel
config): a conditioner's context (the pipeline's Gemma-2 states, conditioner identity, in its configs) through the
context refiner, the image tokens through the noise refiner, then joint attention over both (`models/lumina2.py`).
The denoiser family contract is in `denoisers/__init__`.

Lumina's time runs the other way (0 = noise, 1 = clean) and its network predicts x0 - eps, so the family feeds it
1 - t and returns the negated output: the objective's velocity eps - x0 (rectified flow, as Lumina2Pipeline steps it).
"""
from __future__ import annotations

import os
import types
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lidit_jax import conditioners, denoisers
from lidit_jax.config_checks import fail, tower
from lidit_jax.convert import diffusers_lumina2, diffusers_vae, hf_llm, registry
from lidit_jax.denoisers import diffusers_folder as folder, lidit, sana
from lidit_jax.models import lumina2 as lumina2_lib

Dtype = Any
CLASS = "Lumina2Transformer2DModel"

# LoRA by default: every block's attention projections (diffusers' Lumina 2 LoRA scripts: to_q / to_k / to_v / to_out.0)
LORA_TARGETS = (r"^denoiser/(layers/block|context_refiner_\d+|noise_refiner_\d+)/(query|key|value|out)/kernel$",)
# Lumina-Image-2.0's transformer; a pipeline folder's own replaces it (`pipeline_config`)
CONFIG_DEFAULTS = {"lumina2": dict(
    sample_size=128, patch_size=2, hidden_size=2304, num_layers=26, num_refiner_layers=2, num_attention_heads=24,
    num_kv_heads=8, multiple_of=256, ffn_dim_multiplier=0.0, norm_eps=1e-5, axes_dim_rope=(32, 32, 32),
    axes_lens=(300, 512, 512), cap_feat_dim=2304)}


class Lumina2(nn.Module):
  """The transformer reading a conditioner's context; `drop_B` swaps in the null context (CFG: conditioner.null)."""
  net: lumina2_lib.Lumina2Config
  conditioner: nn.Module
  dtype: Dtype = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  null: str = "learned"

  @nn.compact
  def __call__(self, x_BHWC, t_B, feats, valids, prompts, drop_B=None):
    net = lumina2_lib.Lumina2Transformer(self.net, self.dtype, self.attention, self.remat, name="denoiser")
    t_emb = net.time(1.0 - t_B)
    out = conditioners.outputs(self.conditioner(feats, valids, prompts, t_emb))
    ctx, ctx_valid = conditioners.null_context(self, out.context, out.valid, drop_B, self.null)
    return -net(x_BHWC, t_emb, ctx, ctx_valid)


def net_config(p, latent_hwc: tuple[int, int, int]) -> lumina2_lib.Lumina2Config:
  c = latent_hwc[2]
  return lumina2_lib.Lumina2Config(
      sample_size=p.sample_size, patch_size=p.patch_size, in_channels=c, out_channels=c, hidden_size=p.hidden_size,
      num_layers=p.num_layers, num_refiner_layers=p.num_refiner_layers, num_attention_heads=p.num_attention_heads,
      num_kv_heads=p.num_kv_heads, multiple_of=p.multiple_of, ffn_dim_multiplier=float(p.ffn_dim_multiplier),
      norm_eps=float(p.norm_eps), axes_dim_rope=tuple(p.axes_dim_rope), axes_lens=tuple(p.axes_lens),
      cap_feat_dim=p.cap_feat_dim)


def build(p, shared, conditioner: nn.Module, attention: str) -> Lumina2:
  return Lumina2(net_config(p, shared.latent_hwc), conditioner, jnp.dtype(shared.dtype), attention, shared.remat,
                 shared.null)


def geometry(p, latent_hwc: tuple[int, int, int]):
  return lidit.patch_geometry(latent_hwc, p.patch_size, p.cap_feat_dim)


def abstract_inputs(batch: int, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]]) -> dict:
  return lidit.abstract_inputs(batch, latent_hwc, text_shapes)  # the same call signature


def flops_per_example(p, shared, text_shapes, conditioner=None, conditioner_flops=0) -> dict:
  """2 x (matmul weights x tokens they see) + attention scores and sums: the refiners over the caption and over
  the image tokens, then every layer over both; the caption embedder."""
  t, s = lidit.image_tokens(shared.latent_hwc, p.patch_size), sum(shape[0] for shape in text_shapes)
  cfg = net_config(p, shared.latent_hwc)
  d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
  per_token = 2 * (2 * d * d + 2 * d * kv + 3 * d * cfg.ffn_dim)  # q, out, k, v, SwiGLU
  block = lambda n: n * per_token + 4 * n * n * d
  return {"refiners": p.num_refiner_layers * (block(s) + block(t)), "dit": p.num_layers * block(s + t),
          "caption projection": 2 * s * p.cap_feat_dim * d}


# Per layer and token of the joint sequence, in float32 vectors of the width, what Lumina 2's train step keeps for
# the backward pass besides XLA attention's scores; the working set of a recomputed layer in layers. Measured on the
# TPU compiler (1024 px, 4352 tokens, splash attention, 4 examples per chip, 2 against 6 layers: the slope, less
# the layers' gradients; benchmarks/RESULTS.md, 2026-12-07): LI-DiT's figures (`denoisers/lidit.py`) over-count its
# layers 1.6x (no cross-attention, grouped-query keys and values).
KEPT_PER_TOKEN = {"none": 31.2, "dots": 11.2, "dots_no_batch": 11.2, "full": 4.3}
WORKING_LAYERS = 0.5


def activation_bytes(p, shared, batch: int, text_shapes, tensor: int, itemsize: int, attention: str) -> int:
  """Lumina 2's calibrated count (`KEPT_PER_TOKEN`) in the DiT's form (`denoisers/lidit.py`) over the joint
  sequence (the caption's tokens go through every layer beside the image's), the refiners counted as layers (the
  noise refiner's image tokens and the context refiner's caption tokens: one joint sequence)."""
  t, s = lidit.image_tokens(shared.latent_hwc, p.patch_size), sum(shape[0] for shape in text_shapes)
  joint = types.SimpleNamespace(width=p.hidden_size, depth=p.num_layers + p.num_refiner_layers,
                                num_heads=p.num_attention_heads, patch_size=1, mlp_ratio=4.0)
  return lidit.activation_bytes(joint, shared._replace(latent_hwc=(1, t + s, shared.latent_hwc[2])), batch, (),
                                tensor, itemsize, attention, KEPT_PER_TOKEN, WORKING_LAYERS, "masked")


def param_groups(params) -> dict:
  rest = {k: v for k, v in params.items() if k not in ("denoiser", "conditioner")}
  return {"denoiser (Lumina 2)": params["denoiser"], "conditioner": params.get("conditioner", {}), "embeddings": rest}


def validate(p, latent_hwc: tuple[int, int, int]) -> None:
  """The `lumina2` section's checks, each a ConfigError naming value and fix."""
  if p.hidden_size % p.num_attention_heads or p.num_attention_heads % p.num_kv_heads:
    fail("lumina2.num_attention_heads", p.num_attention_heads, f"must divide hidden_size={p.hidden_size} and be a "
         f"multiple of num_kv_heads={p.num_kv_heads}", "use Lumina-Image-2.0's 24 heads, 8 key / value heads")
  if sum(p.axes_dim_rope) != p.hidden_size // p.num_attention_heads:
    fail("lumina2.axes_dim_rope", tuple(p.axes_dim_rope), f"must sum to the head dim "
         f"{p.hidden_size // p.num_attention_heads}", "split the head dim over the three axes")


def pretrained_weights(p, shared, path: str) -> dict:
  """{"denoiser/...": array} of a Lumina 2 transformer (diffusers' folder, a pipeline folder, or converted) for
  `model.init`. Its layout must be the config's `lumina2` section (a mismatch is refused by field)."""
  module, params = diffusers_lumina2.load(path, jnp.dtype(shared.dtype))
  return folder.denoiser_weights(path, "transformer", "lumina2", module.cfg, net_config(p, shared.latent_hwc), params)


def sample_latent_shape(p, shared, height: int, width: int) -> tuple[int, int, int]:
  """Any size whose latents the patches tile, up to the RoPE tables' rows and columns (axes_lens)."""
  unit = p.patch_size * shared.pixel_factor
  if height % unit or width % unit:
    raise ValueError(f"height x width {height} x {width} must be multiples of {unit}. Fix: round them")
  if max(height, width) // unit > min(p.axes_lens[1:]):
    raise ValueError(f"height x width {height} x {width}: more than {min(p.axes_lens[1:])} patches a side, past "
                     "the transformer's positions (lumina2.axes_lens). Fix: sample smaller")
  return (height // shared.pixel_factor, width // shared.pixel_factor, shared.latent_hwc[2])


# ---- a diffusers Lumina 2 pipeline folder as a config: Pipeline.from_pretrained(folder), configs/lumina2.py ----

# Lumina2Pipeline's default system prompt; " <Prompt Start> " joins it to the prompt
SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of image-text "
                 "alignment based on textual prompts or user prompts.")


def is_pipeline_folder(path: str) -> bool:
  """A Lumina 2 pipeline folder (diffusers' or converted): model_index.json naming a Lumina2Transformer2DModel."""
  return folder.holds(path, "transformer", CLASS)


def pipeline_config(c, path: str, planned: bool = False):
  """The config that samples a Lumina 2 pipeline folder (diffusers' or converted) as diffusers' Lumina2Pipeline does,
  and that configs/lumina2.py fine-tunes: the transformer from its transformer/ (model.init), the text side the
  pipeline's (Gemma-2's second-to-last state over the system prompt + " <Prompt Start> " + the prompt, 256 tokens,
  padding masked; negative prompts and the empty prompt that guides by default without the system prompt), its VAE,
  image size, scheduler (FlowMatchEuler at its shift over the pipeline's own sigmas, linspace(1, 1 / steps)) and
  guidance (4.0 with cfg_normalization; 30 steps). None when `path` is no Lumina 2 folder, unless `planned`: a folder
  that does not exist yet keeps Lumina-Image-2.0's layout (planning before converting)."""
  if not planned and not is_pipeline_folder(path):
    return None
  c.model.update(family="lumina2", dtype="bfloat16", init=path)
  c.conditioner.update(kind="identity", null="empty_prompt")
  c.text.use = "gemma"
  c.text.towers = {"gemma": tower(
      init=os.path.join(path, "text_encoder"), tokenizer=os.path.join(path, "tokenizer"), layer=-2,
      instruction=SYSTEM_PROMPT, separator=" <Prompt Start> ", instruct_negatives=False, max_length=256,
      dtype="bfloat16", plan_arch=sana.GEMMA2_2B)}
  c.text.update(instruction="", use_chat_template=False)
  c.autoencoder.update(kind="vae", factor=8, channels=16, dtype="float32", path=path)
  c.objective.kind = "rectified_flow"
  c.flow.update(timestep="logit_normal", logit_mean=0.0, logit_std=1.0, shift=6.0, sigma_grid="linspace")
  c.data.image_size = 1024
  c.sample.update(steps=30, sampler="flow_match_euler", cfg=4.0, shift=6.0, cfg_renorm=True)
  c.mesh.data = -1  # data parallel over every device
  if not os.path.isdir(path):
    return c
  net = registry.component_config("diffusers_lumina2", path, "transformer", CLASS)
  vae = folder.read_autoencoder(c, path)
  folder.read_flow_scheduler(c, path)
  c.lumina2 = {**c.lumina2.to_dict(), **{k: getattr(net, k) for k in c.lumina2 if hasattr(net, k)}}
  c.data.image_size = net.sample_size * vae.downsample_factor
  return c


# ---- back to a diffusers pipeline folder (python -m lidit_jax.export diffusers) ----

def exportable(config, where: str) -> str:
  """The source pipeline folder of a model diffusers' Lumina2Pipeline runs (its own Gemma, guided by the empty
  prompt); anything else is refused by name."""
  return folder.exportable(config, where, is_pipeline_folder)


def export_pipeline(backend, out: str, save) -> None:
  """Write the model into the (new) folder `out` as a diffusers Lumina 2 pipeline folder: its transformer, VAE and
  Gemma encoder (as the backend holds them), the source's tokenizer, scheduler config and options."""
  config = backend.setup.config
  net = net_config(config.lumina2, denoisers.latent_hwc(config))
  folder.export_transformer_pipeline(backend, out, save, exportable(config, out),
                                     (CLASS, lambda params: diffusers_lumina2.to_diffusers(net, params)),
                                     ("gemma", hf_llm, "Gemma2Model", "configs/lumina2.py"))


def lora_names(p, shared):
  """(path, layer) -> the module names LoRA files give a kernel: diffusers' (`transformer.` + its state-dict
  module: `transformer.layers.0.attn.to_q`)."""
  return folder.lora_names(diffusers_lumina2.plan(net_config(p, shared.latent_hwc)))


def pipeline_parts(src: str, dtype) -> dict | None:
  """{component: (conversion family, checked conversion)} of a Lumina 2 pipeline folder for `convert diffusers`
  (None for another folder)."""
  if not is_pipeline_folder(src):
    return None
  return folder.transformer_parts(src, dtype, diffusers_lumina2, diffusers_vae, hf_llm)


def lora_tower_prefixes(config) -> dict:
  """No text encoder LoRA: Lumina 2's LoRAs train the transformer only."""
  return {}
