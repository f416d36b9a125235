"""The Stable Diffusion family (`model.family=unet`, options in `unet`): a conditioner's context (plain tokens, SD
style, by default in its configs; LI-DiT's refiners work too) read by cross-attention in diffusers' U-Net
(`models/unet.py`). The denoiser family contract is in `denoisers/__init__`.

The contract's time is in [0, 1]; the U-Net's embedder takes diffusers' timesteps, so it is scaled by
`unet.time_scale` (1000: SD's; a pipeline folder's scheduler's num_train_timesteps). FLOPs come from XLA's count of the lowered U-Net (one example, nothing
compiled): its convolutions are not worth a hand count.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax import conditioners, denoisers, torch_view
from lidit_jax.config_checks import fail, one_of, tower, tower_names
from lidit_jax.convert import diffusers_unet, diffusers_vae, hf_clip, hf_text, registry, sd_single_file
from lidit_jax.denoisers import diffusers_folder as folder, lidit
from lidit_jax.models import layers, unet as unet_lib

Dtype = Any

# model.family=unet: diffusers' UNet2DConditionModel fields (per-block ones as tuples or one value), SD 1.x's
# LoRA by default: every transformer block's attention projections, as diffusers' LoRA scripts target them
# (to_q / to_k / to_v / to_out.0; the Diff Adapter's second attention too)
LORA_TARGETS = (r"^denoiser/.*/attn(1|2|2_new)/(to_q|to_k|to_v|to_out_0)/kernel$",)
CONFIG_DEFAULTS = {"unet": dict(
    block_out_channels=(320, 640, 1280, 1280), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, num_heads=8,
    transformer_layers_per_block=1, cross_attention_dim=768, norm_num_groups=32, use_linear_projection=False,
    addition_embed_type="",  # "text_time": SDXL's pooled text + size / crop ids (a tower with output "pooled"
    addition_time_embed_dim=0,  # gives the text; the ids are the image size, uncropped)
    projection_class_embeddings_input_dim=0,
    # a conditioner's second context (the Diff Adapter's code): a new cross-attention beside each original one,
    # mixed a1 exp(b1) orig + a2 exp(b2) new, a = (1, 0), b = 0 at init (the U-Net unchanged): "per_layer" mixes,
    # or one "global" mix
    second_attention="per_layer",
    time_scale=1000.0)}  # the embedder's timesteps for the contract's t in [0, 1] (diffusers': 0 .. 1000)


class SDUNet(nn.Module):
  """The U-Net reading a conditioner's context; `drop_B` swaps in the null context (CFG: conditioner.null). SDXL's
  added conditions: the conditioner's pooled vector (zero where dropped) and the size ids of an uncropped image
  of the input's size in pixels (`pixel_factor`: the autoencoder's), as diffusers' SDXL pipelines default them."""
  unet: unet_lib.UNetConfig
  conditioner: nn.Module
  time_scale: float = 1000.0
  dtype: Dtype = jnp.float32
  attention: str | None = None
  remat: str = "none"
  null: str = "learned"
  pixel_factor: int = 1
  second_mix: str = "per_layer"  # unet.second_attention

  @nn.compact
  def __call__(self, x_BHWC, t_B, feats, valids, prompts, drop_B=None):
    width = self.unet.cross_attention_dim
    # The conditioner's timestep embedding (LI-DiT's refiners read it; plain tokens ignore it and its weights)
    t_emb = layers.TimestepEmbedder(width, dtype=self.dtype, name="t_embedder")(t_B)
    out = conditioners.outputs(self.conditioner(feats, valids, prompts, t_emb))
    ctx, ctx_valid = conditioners.null_context(self, out.context, out.valid, drop_B, self.null)
    pooled, extra = out.pooled, {}
    if out.code is not None:  # a second context (the Diff Adapter's code): the U-Net's new cross-attentions
      code, code_valid = conditioners.null_context(self, out.code, out.code_valid, drop_B, self.null, "null_code")
      extra = dict(code_BMC=code, code_valid_BM=code_valid)
    if self.unet.addition_embed_type == "text_time":
      if pooled is None:
        raise ValueError("unet.addition_embed_type='text_time' (SDXL) needs a pooled text vector: a tower with "
                         "output='pooled' read by conditioner.kind='identity' (configs/sdxl.py)")
      if drop_B is not None:
        pooled = jnp.where(drop_B[:, None], 0, pooled)
      b, h, w, _ = x_BHWC.shape
      h, w = h * self.pixel_factor, w * self.pixel_factor
      extra.update(text_embeds=pooled, time_ids=jnp.tile(jnp.asarray([[h, w, 0, 0, h, w]], jnp.float32), (b, 1)))
    net = unet_lib.UNet2DConditionModel(self.unet, self.dtype, self.attention, self.remat, self.second_mix,
                                        name="denoiser")
    return net(x_BHWC, t_B * self.time_scale, ctx, ctx_valid, **extra)


def unet_config(u, latent_hwc: tuple[int, int, int]) -> unet_lib.UNetConfig:
  """The model's config from the `unet` section, for latents of `latent_hwc` at data.image_size."""
  n = len(u.block_out_channels)
  per_block = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
  return unet_lib.UNetConfig(
      in_channels=latent_hwc[2], out_channels=latent_hwc[2],
      block_out_channels=tuple(u.block_out_channels), down_block_types=tuple(u.down_block_types),
      up_block_types=tuple(u.up_block_types), layers_per_block=u.layers_per_block,
      num_heads=per_block(u.num_heads), transformer_layers_per_block=per_block(u.transformer_layers_per_block),
      cross_attention_dim=u.cross_attention_dim, norm_num_groups=u.norm_num_groups,
      use_linear_projection=u.use_linear_projection, sample_size=latent_hwc[0],
      addition_embed_type=u.get("addition_embed_type") or None,
      addition_time_embed_dim=u.get("addition_time_embed_dim") or None,
      projection_class_embeddings_input_dim=u.get("projection_class_embeddings_input_dim") or None)


def migrate(saved: dict) -> None:
  """Until 2026-12-06 the U-Net scaled its time by the DDPM section's num_train_timesteps: a run saved then keeps
  that scale (the only place this file reads that section)."""
  unet, ddpm_section = saved.get("unet"), saved.get("ddpm", {})
  if isinstance(unet, dict) and "time_scale" not in unet and "num_train_timesteps" in ddpm_section:
    unet["time_scale"] = float(ddpm_section["num_train_timesteps"])


def build(u, shared, conditioner: nn.Module, attention: str) -> SDUNet:
  return SDUNet(unet_config(u, shared.latent_hwc), conditioner, float(u.time_scale), jnp.dtype(shared.dtype),
                attention, shared.remat, shared.null, shared.pixel_factor, u.get("second_attention", "per_layer"))


def geometry(u, latent_hwc: tuple[int, int, int]):
  """Its unit: the down blocks halve the latents len(block_out_channels) - 1 times; its tokens: the latent
  positions of the first attention blocks."""
  return denoisers.Geometry(latent_hwc, 2 ** (len(u.block_out_channels) - 1), latent_hwc[0] * latent_hwc[1],
                            u.cross_attention_dim)


def abstract_inputs(batch: int, latent_hwc: tuple[int, int, int], text_shapes: Sequence[tuple[int, ...]]) -> dict:
  return lidit.abstract_inputs(batch, latent_hwc, text_shapes)  # the same call signature


def flops_per_example(u, shared, text_shapes: Sequence[tuple[int, ...]], conditioner, conditioner_flops: int) -> dict:
  """{"unet": XLA's forward FLOPs of one example: the whole family module lowered, less the conditioner's count}."""
  module = build(u, shared, conditioner, "xla")
  inputs = abstract_inputs(1, shared.latent_hwc, text_shapes)
  params = jax.eval_shape(lambda kw: module.init(jax.random.key(0), **kw), inputs)["params"]
  lowered = jax.jit(lambda p, kw: module.apply({"params": p}, **kw)).lower(params, inputs)
  return {"unet": float(lowered.cost_analysis()["flops"]) - conditioner_flops}


def activation_bytes(u, shared, batch: int, text_shapes: Sequence[tuple[int, ...]], tensor: int, itemsize: int,
                     attention: str) -> int:
  """Rough bytes kept for the backward pass, at each block's resolution. Without remat: per resnet about 6 feature
  maps, per transformer layer about 12 token maps plus the self- and cross-attention probabilities. Rematerialised,
  a resnet keeps its input (its convolutions are not dots: every policy recomputes them); a transformer keeps its
  input ("full"), or its dense layers' outputs (about 10 token maps: "dots_no_batch"), plus the probabilities
  ("dots"); the probabilities only of the calls XLA's kernel runs (`attention`: the resolved kernel; splash runs
  those its 128-token blocks tile)."""
  cfg = unet_config(u, shared.latent_hwc)
  remat = shared.remat
  resnet_maps = 6 if remat == "none" else 1
  attn_maps = {"none": 12, "dots": 10, "dots_no_batch": 10, "full": 1}[remat]
  scores = remat in ("none", "dots")
  h, w, _ = shared.latent_hwc
  s = sum(shape[0] for shape in text_shapes)
  total = 0
  for i, width in enumerate(cfg.block_out_channels):
    tokens = (h >> i) * (w >> i)
    resnets = 2 * cfg.layers_per_block + 1 + (2 if i == len(cfg.block_out_channels) - 1 else 0)  # down + up (+ mid)
    attn_layers = cfg.transformer_layers_per_block[i] * (
        ("CrossAttnDownBlock2D" == cfg.down_block_types[i]) * cfg.layers_per_block
        + ("CrossAttnUpBlock2D" == cfg.up_block_types[::-1][i]) * (cfg.layers_per_block + 1)
        + (i == len(cfg.block_out_channels) - 1))
    total += resnets * resnet_maps * tokens * width / tensor
    keys = sum(n for n in (tokens, s) if lidit.scores_bytes(1, tokens, n, attention, "none", False))  # XLA's calls
    total += attn_layers * (attn_maps * tokens * width / tensor + scores * cfg.num_heads[i] / tensor * tokens * keys)
  return int(FLOAT32_NORMS * batch * total * itemsize)


# What the TPU compiler keeps over the count above in the model's dtype: group norms, softmax and the residual adds
# in float32 (SD 1.5 at 512 px, 4 examples per chip, no remat: 20.2 GiB compiled against 7.0 GiB counted;
# benchmarks/RESULTS.md, 2026-12-05).
FLOAT32_NORMS = 2.9


def param_groups(params) -> dict:
  rest = {k: v for k, v in params.items() if k not in ("denoiser", "conditioner")}
  return {"denoiser (U-Net)": params["denoiser"], "conditioner": params.get("conditioner", {}),  # identity: none
          "embeddings": rest}


def pretrained_weights(u, shared, path: str) -> dict:
  """{"denoiser/...": array} of a converted diffusers U-Net (`python -m lidit_jax.convert diffusers` or
  `single-file`: OUT or OUT/unet) for `model.init`: the U-Net starts from it, the conditioner and the null context
  from their initialisation. Its layout must be the config's `unet` section (a mismatch is refused by field)."""
  if os.path.isfile(os.path.join(path, "model_index.json")):
    path = os.path.join(path, "unet")
  module, params = diffusers_unet.load_unet(path, jnp.dtype(shared.dtype))
  # sample_size, upcast_attention: not in the weights' layout (the image size is data.image_size)
  return folder.denoiser_weights(path, "U-Net", "unet", module.cfg, unet_config(u, shared.latent_hwc), params,
                                 ignore=("sample_size", "upcast_attention"))


def validate(u, latent_hwc: tuple[int, int, int]) -> None:
  """The `unet` section's checks, each a ConfigError naming value and fix (the image size against its unit:
  configs.validate, from the geometry)."""
  try:
    cfg = unet_config(u, latent_hwc)
  except ValueError as e:
    fail("unet.block_out_channels", tuple(u.block_out_channels), str(e).split(". Fix")[0],
         "give every per-block field (block types, num_heads, transformer_layers_per_block) one entry per block")
  bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
  if bad:
    fail("unet.block_out_channels", cfg.block_out_channels, f"{bad} not divisible by unet.norm_num_groups="
         f"{cfg.norm_num_groups}", "use multiples of it")
  for width, heads in zip(cfg.block_out_channels, cfg.num_heads):
    if width % heads:
      fail("unet.num_heads", cfg.num_heads, f"{heads} heads do not divide a block width of {width}",
           "pick head counts that divide each block's width")
  one_of("unet.second_attention", u.get("second_attention", "per_layer"), ("per_layer", "global"))


# ---- a diffusers Stable Diffusion pipeline folder as a config: Pipeline.from_pretrained(folder), configs/sd15.py ----

# The text towers' architectures for planning before the folder exists (text.towers.*.plan_arch)
CLIP_L = dict(model_type="clip_text_model", vocab_size=49408, hidden_size=768, intermediate_size=3072,
              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_BIGG = dict(model_type="clip_text_model", vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                 num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                 projection_dim=1280)
# SDXL base's layout, replaced by the folder's own when it exists (SD 1.5's is the `unet` section's default)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), layers_per_block=2, num_heads=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, norm_num_groups=32,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def is_pipeline_folder(path: str) -> bool:
  """A Stable Diffusion pipeline folder (diffusers' or converted): model_index.json naming a UNet2DConditionModel."""
  return folder.holds(path, "unet", "UNet2DConditionModel")


def pipeline_config(c, path: str, xl: bool | None = None):
  """The config that samples a Stable Diffusion 1.x / 2.x / XL pipeline folder (diffusers' or converted) as
  diffusers' pipeline does, and that configs/sd15.py and sdxl.py fine-tune: the U-Net from its unet/ (model.init),
  the text side the pipeline's (conditioner identity over its CLIP encoders: 77 tokens, no padding mask; SD 1.x /
  2.x the normed last state, SDXL both encoders' penultimate states side by side and the second's projected pooled
  output), its VAE, image size and scheduler (`from_pipeline_folder`), its guidance default (7.5; SDXL 5.0).
  `c`: a base config (configs.base_config()), filled in and returned. `xl` None: read from the folder (None when
  `path` is no pipeline folder); given, a folder that does not exist yet keeps SD 1.5's or SDXL base's layout
  (planning before converting)."""
  if xl is None:
    if not is_pipeline_folder(path):
      return None
    xl = registry.component_config("diffusers_unet", path, "unet", "UNet2DConditionModel").addition_embed_type == "text_time"
  c.model.update(family="unet", dtype="bfloat16")
  c.conditioner.update(kind="identity", null="empty_prompt")
  sd_clip = dict(mask_padding=False, max_length=77, dtype="bfloat16")
  encoder = lambda n, **kw: tower(init=os.path.join(path, "text_encoder" + n),
                                          tokenizer=os.path.join(path, "tokenizer" + n), **sd_clip, **kw)
  if xl:
    c.unet = {**c.unet.to_dict(), **SDXL_UNET}  # our own fields (second_attention, time_scale) stay
    c.conditioner.null = "zeros"
    c.text.use = "clip,clip_2,pooled"
    c.text.towers = {"clip": encoder("", layer=-2, plan_arch=CLIP_L), "clip_2": encoder("_2", layer=-2, plan_arch=CLIP_BIGG),
                     "pooled": encoder("_2", layer=-2, output="pooled", plan_arch=CLIP_BIGG)}
  else:
    c.text.use = "clip"
    c.text.towers = {"clip": encoder("", layer=-1, final_norm=True, plan_arch=CLIP_L)}
  c.text.update(instruction="", use_chat_template=False)
  c.autoencoder.update(kind="vae", factor=8, channels=4, dtype="float32")
  c.objective.kind = "ddpm"
  c.data.image_size = 1024 if xl else 512
  c.sample.update(steps=50, sampler="euler" if xl else "pndm", cfg=5.0 if xl else 7.5)
  c.mesh.data = -1  # data parallel over every device
  return from_pipeline_folder(c, path)


def from_pipeline_folder(c, path: str):
  """Point `c` at a Stable Diffusion pipeline folder: the U-Net starts from its unet/ (model.init), the VAE is its
  vae/; the `unet` section, the VAE's factor and channels, the image size (unet sample_size x the factor), the
  `ddpm` section and sampler (its scheduler; `ddpm.scheduler_keys` the keys it sets, so that another sampler takes
  its own class's defaults for the rest, as diffusers' `OtherScheduler.from_config` does) and the unconditional
  context (zeros with force_zeros_for_empty_prompt, else the empty prompt) are read from its JSON files (no
  weights). Without the folder, `c` keeps the values it has."""
  c.model.init, c.autoencoder.path = path, path
  if not os.path.isdir(path):
    return c
  unet = registry.component_config("diffusers_unet", path, "unet", "UNet2DConditionModel")
  vae = folder.read_vae_and_scheduler(c, path)
  c.unet = {**c.unet.to_dict(), **{k: getattr(unet, k) or type(v)() for k, v in c.unet.items()
                                   if hasattr(unet, k)}}  # None -> "" / 0; our own fields (second_attention) kept
  c.data.image_size = unet.sample_size * vae.downsample_factor
  c.unet.time_scale = float(c.ddpm.num_train_timesteps)  # the U-Net was trained on its scheduler's timesteps
  return c


def sample_latent_shape(u, shared, height: int, width: int) -> tuple[int, int, int]:
  """Latents for an image of height x width: any size whose latents the U-Net halves evenly and that diffusers'
  pipelines take (multiples of 8 latent pixels); SDXL's time ids follow the size."""
  f = shared.pixel_factor
  unit = max(8, 2 ** (len(u.block_out_channels) - 1)) * f
  if height % unit or width % unit:
    raise ValueError(f"height x width {height} x {width} must be multiples of {unit}. Fix: round them")
  return (height // f, width // f, shared.latent_hwc[2])


# ---- back to a diffusers pipeline folder or an original single file (python -m lidit_jax.export diffusers) ----

def exportable(config, where: str) -> str:
  """The source pipeline folder of a model diffusers' pipelines run: a U-Net reading the folder's own text encoders'
  features (conditioner identity), guided as that pipeline guides. Anything else is refused by name."""
  source = folder.source_pipeline(config, where, is_pipeline_folder)
  folder.exportable_text(config, where, source, tower_names(config))
  return source


def _parts(backend, where: str):
  """(source folder, its model_index, U-Net config, U-Net params, VAE config, VAE params, [(name, CLIP config,
  params)]): the backend's U-Net and VAE weights with the source's layouts, its text encoders as the pipeline
  holds them (with their heads, read again from the folder) with the backend's tower weights over them (the same,
  but where a LoRA was merged into them: `Pipeline.load_lora`)."""
  config = backend.setup.config
  source = exportable(config, where)
  index = folder.index(source)
  unet_cfg = registry.component_config("diffusers_unet", source, "unet", "UNet2DConditionModel")
  to_f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  encoders, prefixes = [], lora_tower_prefixes(config)
  for name in ("text_encoder", "text_encoder_2"):
    entry = index.get(name)
    if entry and entry[0] is not None:
      module, params = hf_text.load_hf_text_model(os.path.join(source, name), jnp.float32,
                                                  adapt=hf_clip.sd_head(entry[1]))
      for tower, names in prefixes.items():
        if names[0] == name:  # the tower's weights as the backend holds them, over the folder's
          held = {p: v for p, v in jax.tree_util.tree_leaves_with_path(backend.params["frozen"]["towers"][tower])}
          params = jax.tree_util.tree_map_with_path(lambda p, v: jnp.asarray(held.get(p, v), jnp.float32), params)
      encoders.append((name, module.cfg, params))
  return (source, index, unet_cfg, to_f32(backend.params["model"]["denoiser"]), backend.setup.autoencoder.module.cfg,
          to_f32(backend.params["frozen"]["autoencoder"]), encoders)


def lora_names(u, shared):
  """(path, layer) -> the module names LoRA files give a kernel, the first the one `export lora` writes: diffusers'
  (`unet.` + its state-dict module, as `save_lora_weights` writes: `unet.down_blocks.0.attentions.0.
  transformer_blocks.0.attn1.to_q`), the original layout's (`unet.input_blocks.1.1...`, whose kohya form is the
  SGM naming kohya's SDXL files use) and ComfyUI's (`diffusion_model.input_blocks.1.1...`). What is not the U-Net's
  (a conditioner's) keeps the documented name."""
  ldm = diffusers_unet.ldm_modules(unet_config(u, shared.latent_hwc))

  def names(path, layer=None) -> list[str]:
    if path[0] != "denoiser" or layer is not None:
      return [torch_view.module_key(path, layer)]
    module = diffusers_unet.torch_key(path[1:]).rpartition(".")[0]
    original = diffusers_unet.ldm_key(module + ".weight", ldm).rpartition(".")[0]
    return [f"unet.{module}", f"unet.{original}", f"diffusion_model.{original}"]
  return names


def lora_tower_prefixes(config) -> dict:
  """{tower name: prefixes}: a pipeline's text encoders as LoRA files name them, diffusers' component
  (`text_encoder`, `text_encoder_2`) and kohya's (`te` for SD 1.x / 2.x's one encoder, `te1` / `te2` for SDXL's)."""
  towers = config.text.towers
  components = {n: os.path.basename(os.path.normpath(t.init)) for n, t in towers.items() if t.init != "random"}
  two = "text_encoder_2" in components.values()
  kohya = {"text_encoder": "te1" if two else "te", "text_encoder_2": "te2"}
  return {n: [c, kohya[c]] for n, c in components.items() if c in kohya}


def export_pipeline(backend, out: str, save) -> None:
  """Write the model into the (new) folder `out` as a diffusers pipeline folder: its U-Net and VAE, the source
  pipeline's text encoders, tokenizers, scheduler config and options (`save(directory, config, state, weights
  file)` writes one component)."""
  source, index, unet_cfg, unet_params, vae_cfg, vae_params, encoders = _parts(backend, out)
  save(os.path.join(out, "unet"), *diffusers_unet.to_diffusers(unet_cfg, unet_params), "diffusion_pytorch_model.safetensors")
  save(os.path.join(out, "vae"), *diffusers_vae.to_diffusers(vae_cfg, vae_params), "diffusion_pytorch_model.safetensors")
  written = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
  for name, cfg, params in encoders:
    config, state = hf_clip.to_hf(cfg, params)
    save(os.path.join(out, name), config, state, "model.safetensors")
    tok_name = name.replace("text_encoder", "tokenizer")
    written[name] = ["transformers", config["architectures"][0]]
    written[tok_name] = ["transformers", folder.copy_tokenizer(source, out, tok_name)]
  folder.finish_export(source, out, written)


def single_file_state(backend, where: str) -> dict:
  """The model in the original single-file layout that A1111, ComfyUI and diffusers' `from_single_file` read:
  `model.diffusion_model.*` (the U-Net), `first_stage_model.*` (the VAE) and the text encoders under their SD 1.x /
  2.x / XL keys (`convert.sd_single_file`)."""
  _, _, unet_cfg, unet_params, vae_cfg, vae_params, encoders = _parts(backend, where)
  state = {**diffusers_unet.to_ldm(unet_cfg, unet_params), **diffusers_vae.to_ldm(vae_cfg, vae_params)}
  by_name = {name: (cfg, params) for name, cfg, params in encoders}
  for name, prefix, layout in sd_single_file.TEXT_ENCODERS[sd_single_file.kind_of(unet_cfg)]:
    state.update(sd_single_file.text_state(*by_name[name], prefix, layout))
  return state


def pipeline_parts(src: str, dtype) -> dict | None:
  """{component: (conversion family, checked conversion)} of a Stable Diffusion pipeline folder for `convert
  diffusers`: its U-Net, VAE and CLIP text encoders (None for another folder)."""
  if not is_pipeline_folder(src):
    return None
  parts = {"unet": (diffusers_unet, diffusers_unet.Conversion.prepare(os.path.join(src, "unet"), dtype)),
           "vae": (diffusers_vae, diffusers_vae.Conversion.prepare(os.path.join(src, "vae"), dtype))}
  index = folder.index(src)
  for name in ("text_encoder", "text_encoder_2"):
    entry = index.get(name)
    if entry and entry[0] is not None:
      conv = hf_text.Conversion.prepare(os.path.join(src, name), dtype, adapt=hf_clip.sd_head(entry[1]))
      parts[name] = (conv.fam, conv)
  return parts
