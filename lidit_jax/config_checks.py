"""What every plugin shares about configs: the form of a refusal (`ConfigError` naming the value, why it cannot
work, and the fix) and the text tower's section (`tower`, `tower_names`). A leaf module (it imports only `cli`),
so the registries and their members declare and check their own sections without importing `configs`, which
assembles them."""
from __future__ import annotations

from typing import NoReturn

import ml_collections

from lidit_jax.cli import UserError


class ConfigError(UserError, ValueError):
  """A config value that cannot work (a ValueError too, for callers that catch those)."""


def fail(key, value, why, fix) -> NoReturn:
  raise ConfigError(f"config {key}={value!r}: {why}. Fix: {fix}.")


def one_of(key, value, options):
  if value not in options:
    fail(key, value, f"must be one of {sorted(options)}", f"set --config.{key} to one of them")


def tower(**overrides) -> ml_collections.ConfigDict:
  """One frozen text tower. `init`: "random" (a random Llama-style tower built from the fields below, the
  demo's) or a local directory: a Hugging Face model (config.json + safetensors) or the output of
  `python -m lidit_jax.convert hf-text`; its architecture then comes from that directory and the fields
  kind .. rope_theta are ignored. `tokenizer`: "" (the demo's word tokenizer for random towers, else the
  one in `init`), "words", or a local tokenizer directory. `layer`: which hidden state LI-DiT reads;
  `all_layers`: every hidden state instead, [B, L, num_layers + 1, D] (for conditioners that read them all).
  Stable Diffusion's text side: `final_norm` applies a CLIP tower's final LayerNorm to the chosen layer (SD 1.x /
  2.x read layer -1 so normed: last_hidden_state; diffusers' clip_skip normed earlier layers); `mask_padding=False`
  runs the tower and gives the context every position, padding included, as SD's pipelines run CLIP;
  `output="pooled"`: the end-of-text token's normed, projected state instead (CLIPTextModelWithProjection's
  text_embeds, SDXL's pooled vector), features [B, 1, P], which conditioner identity hands to the U-Net.
  `output="scores"` (decoder-only LLM towers): the LLM Diff Adapter's per-block scores, [B, L, num_layers + 1, D]
  (entry 0 the embedding output, entry t block t's update with context minus its update of the token alone;
  `alone`: "diagonal", the same block with attention to the token itself, or "trajectory", a context-free run;
  models/llm.DecoderLM). The tower then runs about twice its FLOPs."""
  t = ml_collections.ConfigDict(dict(
      kind="llama", init="random", tokenizer="", vocab_size=0,
      hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=192, rope_theta=10000.0,
      layer=-3,  # LI-DiT reads the third-to-last block's output
      all_layers=False,  # give every hidden state (the embeddings, then each block's output) instead
      final_norm=False,  # CLIP only: its final LayerNorm on the chosen layer
      output="hidden",  # or "pooled": a CLIP with projection's pooled output [B, 1, P] (SDXL's text_embeds)
                        # or "scores": an LLM's per-block scores (the Diff Adapter's), read as `alone` says
      alone="diagonal",
      instruction=None,  # this tower's own text before the prompt (LLM4GEN's T5: "pre"); None: text.instruction
      mask_padding=True,  # False: no padding mask in the tower or the context (SD's CLIP)
      lowercase=False,  # lower-case the prompt first (PixArt's T5)
      separator=" ",  # without a chat template: the text between the instruction and the prompt
      # "first_and_last": Sana's selection, the instruction and prompt run to (instruction tokens + max_length - 2)
      # tokens and the features keep the first and the last max_length - 1 (prompt.PromptEncoder.selection)
      selection="all",
      instruct_negatives=True,  # False: negative prompts and the empty prompt are encoded without the instruction
      # config.json fields (model_type, sizes) the planner assumes while `init` does not exist yet, for a tower
      # the Llama fields above cannot describe (SD's CLIP, LLM4GEN's T5): `plan` before converting anything
      plan_arch={},
      max_length=64, dtype="bfloat16"))
  t.update(overrides)
  return t


def tower_names(config) -> list[str]:
  """The towers `text.use` names, in order."""
  return used_towers(config.text)


def used_towers(text) -> list[str]:
  """The towers the `text` section's `use` names, in order."""
  return [n.strip() for n in text.use.split(",") if n.strip()]


def plugin_section(config, module):
  """The section a plugin module's CONFIG_DEFAULTS declares, read from `config`; None when it declares none."""
  path = section_path(getattr(module, "CONFIG_DEFAULTS", {}))
  return config[path] if path else None


def section_path(defaults: dict) -> str:
  """The dotted path of the one section a plugin's CONFIG_DEFAULTS declares ({"model": {"refiner": {...}}}:
  "model.refiner")."""
  path = []
  while len(defaults) == 1 and isinstance(next(iter(defaults.values())), dict):
    key = next(iter(defaults))
    path.append(key)
    defaults = defaults[key]
  return ".".join(path)
