"""The text encoders of original Stable Diffusion single files (CompVis / Stability / A1111 layout), both ways.

SD 1.x keeps transformers' CLIP-L under `cond_stage_model.transformer.text_model.`; SD 2.x an OpenCLIP ViT-H text
tower under `cond_stage_model.model.`; SDXL CLIP-L under `conditioner.embedders.0.transformer.text_model.` and
OpenCLIP bigG under `conditioner.embedders.1.model.`. OpenCLIP names differ (`transformer.resblocks.i.ln_1`,
`mlp.c_fc`, `ln_final`, `positional_embedding`), fuses q / k / v into `attn.in_proj_weight` [3D, D] and keeps
`text_projection` as the [D, P] matrix a row vector multiplies (transformers' Linear holds its transpose). The
U-Net's and VAE's original keys are in `diffusers_unet` / `diffusers_vae`. The layer count comes from the
diffusers config (SD 2.x's has 23 of the file's 24: its pipeline reads the penultimate layer, so the last is
never used, nor exported).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from lidit_jax.convert import hf_clip, registry
from lidit_jax.convert import safetensors_io as io

# {kind: [(pipeline component, key prefix, layout)]}
TEXT_ENCODERS = {
    "sd15": [("text_encoder", "cond_stage_model.transformer.text_model.", "hf")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.text_model.", "hf"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")],
}
_OPENCLIP = ((r"^embeddings\.token_embedding\.weight$", "token_embedding.weight"),
             (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
             (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
             (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
             (r"^encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$", r"transformer.resblocks.\1.attn.in_proj_\2"),
             (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
             (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
             (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
             (r"^final_layer_norm\.", "ln_final."), (r"^text_projection\.weight$", "text_projection"))
_QKV = re.compile(r"self_attn\.([qkv])_proj\.")
_IGNORED = re.compile(r"(logit_scale|position_ids|attn_mask|text_projection)$")


def kind_of(unet_cfg) -> str:
  """sd15 / sd2 / sdxl of a U-Net config (SDXL adds text and time embeddings; SD 2.x has linear projections)."""
  return ("sdxl" if unet_cfg.addition_embed_type == "text_time" else
          "sd2" if unet_cfg.use_linear_projection else "sd15")


def openclip_key(key: str) -> str:
  """A transformers CLIP text key (no "text_model.") in OpenCLIP's naming."""
  for pattern, replacement in _OPENCLIP:
    new, n = re.subn(pattern, replacement, key)
    if n:
      return new
  raise KeyError(f"{key} has no OpenCLIP name")


def _openclip_source(key: str, transform, width: int):
  """(OpenCLIP key, transform) reading what transformers keeps as `key`: q / k / v as thirds of in_proj."""
  qkv = _QKV.search(key)
  if qkv:
    i = "qkv".index(qkv.group(1))
    return openclip_key(key), lambda w: transform(w[i * width:(i + 1) * width])
  if key == "text_projection.weight":
    return openclip_key(key), lambda w: transform(w.T)
  return openclip_key(key), transform


def text_plan(cfg, prefix: str, layout: str) -> dict:
  """hf_clip's plan with the keys (and, for OpenCLIP, the layouts) of a single file's text encoder."""
  out = {}
  for path, src in hf_clip.plan(cfg).items():
    if layout == "hf":
      out[path] = dataclasses.replace(src, keys=tuple(prefix + k for k in src.keys))
      continue
    pairs = [_openclip_source(k, src.transform, cfg.hidden_size) for k in src.keys]
    # a stacked parameter's layers take the same slice: the first layer's transform serves them all
    out[path] = dataclasses.replace(src, keys=tuple(prefix + k for k, _ in pairs), transform=pairs[0][1])
  return out


@dataclasses.dataclass
class TextPart:
  """One text encoder of a single file, checked against the config's module: `run` streams its parameters."""
  source: str
  cfg: object
  module: object
  files: io.CheckpointFiles
  expected: dict
  plan: dict
  resolved: dict
  prefix: str

  @classmethod
  def prepare(cls, path: str, hf_config: dict, class_name: str, prefix: str, layout: str, dtype) -> "TextPart":
    cfg = hf_clip.sd_head(class_name)(hf_clip.config_from_hf(hf_config))
    module = hf_clip.make_module(cfg, dtype)
    files = io.CheckpointFiles(path)
    expected = io.flatten_shapes(registry.strip_boxes(hf_clip.abstract_params(module)))
    plan = text_plan(cfg, prefix, layout)
    return cls(path, cfg, module, files, expected, plan, io.check_plan(plan, files, expected), prefix)

  def run(self, dtype, progress: bool = False, **kw) -> dict:
    return io.build_params(self.plan, self.files, self.expected, dtype, progress=progress, resolved=self.resolved,
                           **kw)

  def unused(self) -> list[str]:
    """This encoder's tensors no parameter reads, besides buffers, the logit scale and layers past the config's
    (SD 2.x's last)."""
    planned = {k for names in self.resolved.values() for k in names}
    layer = lambda k: re.search(r"(?:resblocks|layers)\.(\d+)\.", k)
    past = lambda k: layer(k) is not None and int(layer(k).group(1)) >= self.cfg.num_layers
    return sorted(k for k in self.files.keys() if k.startswith(self.prefix) and k not in planned
                  and not _IGNORED.search(k) and not past(k))


def text_state(cfg, params, prefix: str, layout: str) -> dict[str, np.ndarray]:
  """A text encoder's tensors under its single-file keys (export): transformers' state dict renamed, and for
  OpenCLIP q / k / v fused back into in_proj and the projection transposed."""
  _, state = hf_clip.to_hf(cfg, params)
  state = {k.removeprefix("text_model."): v for k, v in state.items()}
  if layout == "hf":
    return {prefix + k: v for k, v in state.items()}
  out = {}
  for i in range(cfg.num_layers):
    for part in ("weight", "bias"):
      qkv = [state.pop(f"encoder.layers.{i}.self_attn.{c}_proj.{part}") for c in "qkv"]
      out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{part}"] = np.concatenate(qkv)
  for k, v in state.items():
    out[prefix + openclip_key(k)] = np.ascontiguousarray(v.T) if k == "text_projection.weight" else v
  return out
