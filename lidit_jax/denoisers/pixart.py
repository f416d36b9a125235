"""PixArt-alpha / Sigma (`model.family=pixart`, options in `pixart`, named as diffusers' PixArtTransformer2DModel
config): a conditioner's context (the pipeline's T5 states, conditioner identity, in its configs) through the
caption projection into the DiT with adaLN-single (`models/pixart.py`). The denoiser family contract is in
`denoisers/__init__`.

The contract's time in [0, 1] is scaled by `pixart.time_scale` (1000: diffusers' timesteps). The transformer
predicts the noise and its learned variance (`learn_sigma`: out_channels twice the latent's, `Geometry.variance`):
the DDPM objective trains both as PixArt did (the noise's MSE plus IDDPM's variational bound, which teaches the
variance only) and samples with the noise, as diffusers' PixArt pipelines do; rectified flow ignores the variance.
"""
from __future__ import annotations

import os
import types
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lidit_jax import conditioners, denoisers
from lidit_jax.config_checks import fail, tower
from lidit_jax.convert import diffusers_pixart, diffusers_vae, hf_t5, registry
from lidit_jax.denoisers import diffusers_folder as folder, lidit
from lidit_jax.models import pixart as pixart_lib

Dtype = Any
CLASS = "PixArtTransformer2DModel"

# LoRA by default: the blocks' attention projections (diffusers' PixArt LoRA scripts: to_q / to_k / to_v / to_out.0)
LORA_TARGETS = (r"^denoiser/dit/blocks/.*/(self_attn|cross_attn)/(query|key|value|out)/kernel$",)
# PixArt-Sigma-XL-2-1024-MS's transformer; a pipeline folder's own replaces it (`pipeline_config`)
CONFIG_DEFAULTS = {"pixart": dict(
    num_attention_heads=16, attention_head_dim=72, num_layers=28,
    learn_sigma=True,  # the variance too: out_channels twice the latent's (PixArt's), trained by DDPM's bound
    caption_channels=4096,
    sample_size=128, patch_size=2, interpolation_scale=2.0, use_additional_conditions=False,
    time_scale=1000.0)}  # the embedder's timesteps for the contract's t in [0, 1]


class PixArt(nn.Module):
  """The transformer reading a conditioner's context; `drop_B` swaps in the null context (CFG: conditioner.null).
  Micro-conditions (PixArt-alpha 1024) are the input's size in pixels (`pixel_factor`: the autoencoder's)."""
  net: pixart_lib.PixArtConfig
  conditioner: nn.Module
  time_scale: float = 1000.0
  dtype: Dtype = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  null: str = "learned"
  pixel_factor: int = 1

  @nn.compact
  def __call__(self, x_BHWC, t_B, feats, valids, prompts, drop_B=None):
    net = pixart_lib.PixArtTransformer(self.net, self.dtype, self.attention, self.remat, name="denoiser")
    _, h, w, _ = x_BHWC.shape
    t_emb = net.time(t_B * self.time_scale, (h * self.pixel_factor, w * self.pixel_factor))
    out = conditioners.outputs(self.conditioner(feats, valids, prompts, t_emb))
    ctx, ctx_valid = conditioners.null_context(self, out.context, out.valid, drop_B, self.null)
    return net(x_BHWC, t_emb, ctx, ctx_valid)  # with learn_sigma: the noise, then the variance (geometry.variance)


def net_config(p, latent_hwc: tuple[int, int, int]) -> pixart_lib.PixArtConfig:
  return pixart_lib.PixArtConfig(
      num_attention_heads=p.num_attention_heads, attention_head_dim=p.attention_head_dim, in_channels=latent_hwc[2],
      out_channels=latent_hwc[2] * (2 if p.learn_sigma else 1), num_layers=p.num_layers, caption_channels=p.caption_channels,
      sample_size=p.sample_size, patch_size=p.patch_size, interpolation_scale=float(p.interpolation_scale),
      use_additional_conditions=bool(p.use_additional_conditions))


def build(p, shared, conditioner: nn.Module, attention: str) -> PixArt:
  return PixArt(net_config(p, shared.latent_hwc), conditioner, float(p.time_scale), jnp.dtype(shared.dtype),
                attention, shared.remat, shared.null, shared.pixel_factor)


def geometry(p, latent_hwc: tuple[int, int, int]):
  return lidit.patch_geometry(latent_hwc, p.patch_size, p.caption_channels or p.num_attention_heads *
                              p.attention_head_dim)._replace(variance=bool(p.learn_sigma))


def abstract_inputs(batch: int, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]]) -> dict:
  return lidit.abstract_inputs(batch, latent_hwc, text_shapes)  # the same call signature


def _as_dit(p):
  """The fields the DiT's FLOP and activation counts read (`denoisers/lidit.py`)."""
  return types.SimpleNamespace(width=p.num_attention_heads * p.attention_head_dim, depth=p.num_layers,
                               num_heads=p.num_attention_heads, patch_size=p.patch_size, mlp_ratio=4.0)


def flops_per_example(p, shared, text_shapes, conditioner=None, conditioner_flops=0) -> dict:
  """The DiT's count, and the caption projection's (two matmuls per text token)."""
  d, s = _as_dit(p).width, sum(shape[0] for shape in text_shapes)
  caption = 2 * s * (p.caption_channels * d + d * d) if p.caption_channels else 0
  return {"dit": lidit.flops_per_example(_as_dit(p), shared, text_shapes)["dit"], "caption projection": caption}


# The working set of the block being differentiated, in blocks kept: PixArt-Sigma's compiled step (1024 px, 4 examples
# per chip, 2 against 6 blocks, XLA attention: its 300 caption keys are no multiple of splash's blocks;
# benchmarks/RESULTS.md, 2026-12-07), where the scores' gradient is the largest temporary.
WORKING_BLOCKS = 1.0


def activation_bytes(p, shared, batch: int, text_shapes, tensor: int, itemsize: int, attention: str) -> int:
  """The DiT's calibrated count (`denoisers/lidit.py`): PixArt's blocks are LI-DiT's (self-, cross-attention, MLP)."""
  return lidit.activation_bytes(_as_dit(p), shared, batch, text_shapes, tensor, itemsize, attention,
                                working_blocks=WORKING_BLOCKS)


def param_groups(params) -> dict:
  rest = {k: v for k, v in params.items() if k not in ("denoiser", "conditioner")}
  return {"denoiser (PixArt)": params["denoiser"], "conditioner": params.get("conditioner", {}),  # identity: none
          "embeddings": rest}


def validate(p, latent_hwc: tuple[int, int, int]) -> None:
  """The `pixart` section's checks, each a ConfigError naming value and fix."""
  width = p.num_attention_heads * p.attention_head_dim
  if width % 4:
    fail("pixart.attention_head_dim", p.attention_head_dim, f"a width of {width} takes no sin-cos positions",
         "use a width (heads x head dim) divisible by 4")
  if p.use_additional_conditions and width % 3:
    fail("pixart.use_additional_conditions", True, f"micro-conditions take a third of the width each, and {width} "
         "is not divisible by 3", "turn them off or use a width divisible by 3")


def pretrained_weights(p, shared, path: str) -> dict:
  """{"denoiser/...": array} of a PixArt transformer (diffusers' folder, a pipeline folder, or converted) for
  `model.init`. Its layout must be the config's `pixart` section (a mismatch is refused by field)."""
  module, params = diffusers_pixart.load(path, jnp.dtype(shared.dtype))
  return folder.denoiser_weights(path, "transformer", "pixart", module.cfg, net_config(p, shared.latent_hwc), params)


def sample_latent_shape(p, shared, height: int, width: int) -> tuple[int, int, int]:
  """Any size whose latents the patches tile (positions interpolate as diffusers' PatchEmbed does)."""
  unit = p.patch_size * shared.pixel_factor
  if height % unit or width % unit:
    raise ValueError(f"height x width {height} x {width} must be multiples of {unit}. Fix: round them")
  return (height // shared.pixel_factor, width // shared.pixel_factor, shared.latent_hwc[2])


# ---- a diffusers PixArt pipeline folder as a config: Pipeline.from_pretrained(folder), configs/pixart_sigma.py ----

# The T5 tower's architecture for planning before the folder exists (text.towers.t5.plan_arch): T5 v1.1 XXL's encoder
T5_XXL = dict(model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
# T5 tokens each pipeline reads (max_sequence_length's default)
MAX_LENGTH = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}


def is_pipeline_folder(path: str) -> bool:
  """A PixArt pipeline folder (diffusers' or converted): model_index.json naming a PixArtTransformer2DModel."""
  return folder.holds(path, "transformer", CLASS)


def pipeline_config(c, path: str, sigma: bool | None = None):
  """The config that samples a PixArt-alpha / Sigma pipeline folder (diffusers' or converted) as diffusers'
  pipeline does (its resolution bins by the transformer's sample_size: 32 -> 256 px, .., 256 -> 2048), and that
  configs/pixart_sigma.py fine-tunes: the transformer from its transformer/ (model.init), the text side the
  pipeline's (the T5 encoder's last state over the lower-cased prompt, 300 tokens for Sigma and 120 for alpha,
  padding masked; the empty prompt guides), its VAE, image size, scheduler and guidance default (4.5; 20 steps).
  `sigma` None: read from the folder (None when `path` is no PixArt folder); given, a folder that does not exist
  yet keeps PixArt-Sigma 1024's layout (planning before converting)."""
  if sigma is None:
    if not is_pipeline_folder(path):
      return None
    sigma = folder.index(path).get("_class_name") != "PixArtAlphaPipeline"
  c.model.update(family="pixart", dtype="bfloat16", init=path)
  c.conditioner.update(kind="identity", null="empty_prompt")
  c.text.use = "t5"
  c.text.towers = {"t5": tower(init=os.path.join(path, "text_encoder"), tokenizer=os.path.join(path, "tokenizer"),
                               layer=-1, lowercase=True, dtype="bfloat16", plan_arch=T5_XXL,
                               max_length=MAX_LENGTH["PixArtSigmaPipeline" if sigma else "PixArtAlphaPipeline"])}
  c.text.update(instruction="", use_chat_template=False)
  c.autoencoder.update(kind="vae", factor=8, channels=4, dtype="float32", path=path)
  c.objective.kind = "ddpm"
  c.ddpm.update(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)  # PixArt's, until the folder says
  c.data.image_size = 1024
  c.sample.update(steps=20, sampler="dpmpp_2m", cfg=4.5, resolution_bins=1024)
  c.mesh.data = -1  # data parallel over every device
  if not os.path.isdir(path):
    return c
  net = registry.component_config("diffusers_pixart", path, "transformer", CLASS)
  vae = folder.read_vae_and_scheduler(c, path)
  c.pixart = {**c.pixart.to_dict(), **{k: getattr(net, k) for k in c.pixart if hasattr(net, k)},
              "learn_sigma": net.out_channels == 2 * net.in_channels}
  c.data.image_size = net.sample_size * vae.downsample_factor
  c.sample.resolution_bins = folder.bin_base(net.sample_size * 8, (256, 512, 1024, 2048))
  c.pixart.time_scale = float(c.ddpm.num_train_timesteps)
  return c


# ---- back to a diffusers pipeline folder (python -m lidit_jax.export diffusers) ----

def exportable(config, where: str) -> str:
  """The source pipeline folder of a model diffusers' PixArt pipelines run (their own text encoder, guided by the empty
  prompt); anything else is refused by name."""
  return folder.exportable(config, where, is_pipeline_folder)


def export_pipeline(backend, out: str, save) -> None:
  """Write the model into the (new) folder `out` as a diffusers PixArt pipeline folder: its transformer, autoencoder
  and text encoder (as the backend holds them), the source's tokenizer, scheduler config and options."""
  config = backend.setup.config
  net = net_config(config.pixart, denoisers.latent_hwc(config))
  folder.export_transformer_pipeline(backend, out, save, exportable(config, out),
                                     (CLASS, lambda params: diffusers_pixart.to_diffusers(net, params)),
                                     ("t5", hf_t5, "T5EncoderModel", "configs/pixart_sigma.py"))


def lora_names(p, shared):
  """(path, layer) -> the module names LoRA files give a kernel: diffusers' (`transformer.` + its state-dict
  module, as PixArt LoRA scripts save: `transformer.transformer_blocks.0.attn1.to_q`)."""
  return folder.lora_names(diffusers_pixart.plan(net_config(p, shared.latent_hwc)))


def pipeline_parts(src: str, dtype) -> dict | None:
  """{component: (conversion family, checked conversion)} of a PixArt pipeline folder for `convert diffusers`
  (None for another folder)."""
  if not is_pipeline_folder(src):
    return None
  return folder.transformer_parts(src, dtype, diffusers_pixart, diffusers_vae, hf_t5)


def lora_tower_prefixes(config) -> dict:
  """No text encoder LoRA: PixArt's LoRAs train the transformer only."""
  return {}
