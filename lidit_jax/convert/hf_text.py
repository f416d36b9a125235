"""Hugging Face text models (decoder LLMs, T5 encoders, CLIP text) -> our Flax towers.

`load_hf_text_model(path, dtype)` accepts either a Hugging Face model directory (config.json +
safetensors) or a directory written by `python -m lidit_jax.convert hf-text` (Orbax params + the
family and config as JSON), and returns `(module, params)`. `module.apply({"params": params}, ids, mask)`
gives every hidden state, stacked [num_layers + 1, B, L, D], in the reference's convention.

Each family module (hf_llm, hf_t5, hf_clip) provides MODEL_TYPES, ANCHORS, IGNORED (key prefixes that
are expected and not used, like an LM head), config_from_hf(dict) -> Config, make_module(cfg, dtype)
and plan(cfg) -> {param path: Source}.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from types import ModuleType

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax import sharding
from lidit_jax.cli import NotFound
from lidit_jax.convert import orbax_io, registry, safetensors_io as io
from lidit_jax.convert.registry import describe, from_description, strip_boxes  # noqa: F401 (the text API)

logger = logging.getLogger(__name__)

FAMILIES = ("hf_llm", "hf_t5", "hf_clip")  # the text families of the registry, imported when first needed


family = registry.family


def family_for(hf_config: dict, where: str = "config.json") -> ModuleType:
  model_type = hf_config.get("model_type")
  # A full CLIP model nests its text config; we read only the text side.
  for fam in map(family, FAMILIES):
    if model_type in fam.MODEL_TYPES:
      return fam
  supported = sorted(t for f in map(family, FAMILIES) for t in f.MODEL_TYPES)
  raise ValueError(f"{where}: model_type={model_type!r} is not supported. Supported: {supported}. Fix: convert a "
                   "model of one of those types (a text tower can be any of them: --config.text.towers.NAME.init), "
                   "or add its family to lidit_jax/convert (a module like hf_llm.py, listed in hf_text.FAMILIES)")


def read_hf_config(path: str) -> dict:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{path} has no config.json (nor {registry.MARKER}); expected a Hugging Face model "
                            "directory or the output of `python -m lidit_jax.convert hf-text`.")
  return io.read_json(cfg_path)


def _converted_text(path: str) -> bool:
  """Whether `path` is a converted directory, refusing one that holds another kind of model (a VAE)."""
  if not registry.marker(path):
    return False
  kind = registry.read_marker(path)["family"]
  if kind not in FAMILIES:
    raise NotFound(f"{path} holds a converted {kind} model, not a text model. Fix: point at a text tower's directory")
  return True


def read_family_and_config(path: str, where: str = "path"):
  """(family module, config) of a Hugging Face or converted directory, from JSON only."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{where}={path!r} is not a directory. Fix: point it at a local Hugging Face model "
                            "directory or at the output of `python -m lidit_jax.convert hf-text SRC OUT` (the "
                            "tiny demo LLMs: `python -m lidit_jax.convert.tiny_models checkpoints/tiny --convert`).")
  if _converted_text(path):
    fam, cfg, _ = from_description(registry.read_marker(path), jnp.float32)
    return fam, cfg
  hf = read_hf_config(path)
  fam = family_for(hf, os.path.join(path, "config.json"))
  return fam, fam.config_from_hf(hf)


def abstract_params(module: nn.Module, max_length: int = 8):
  return registry.token_abstract_params(module, max_length)


def target_shardings(abstract, mesh, rules):
  """{path: NamedSharding} from the parameters' logical axes, or None without a mesh."""
  if mesh is None:
    return None
  return io.flatten_shapes(sharding.fit_to_shapes(abstract, mesh, rules))


@dataclasses.dataclass
class Conversion:
  """A Hugging Face directory checked against our module: call `run` to stream its parameters."""
  path: str
  fam: ModuleType
  cfg: object
  module: nn.Module
  files: io.CheckpointFiles
  abstract: object  # boxed abstract params (logical axes)
  expected: dict
  resolved: dict  # param path -> checkpoint keys, from check_plan

  @classmethod
  def prepare(cls, path: str, dtype=jnp.float32, allow_pickle: bool = False, adapt=None) -> "Conversion":
    """Reads config.json and the tensor index only; every missing or mis-shaped tensor is reported here.
    `adapt(cfg) -> cfg` asks for more than a tower reads (CLIP's head, for SD pipelines)."""
    hf = read_hf_config(path)
    fam = family_for(hf, os.path.join(path, "config.json"))
    cfg = fam.config_from_hf(hf)
    cfg = adapt(cfg) if adapt else cfg
    module = fam.make_module(cfg, dtype)
    files = io.CheckpointFiles(path, allow_pickle=allow_pickle)
    files.find_prefix(fam.ANCHORS)
    abstract = abstract_params(module)
    expected = io.flatten_shapes(strip_boxes(abstract))
    resolved = io.check_plan(fam.plan(cfg), files, expected)
    return cls(path, fam, cfg, module, files, abstract, expected, resolved)

  def run(self, dtype, mesh=None, rules=(), progress: bool = False, **kw) -> dict:
    """build_params over the plan (kw: as_numpy, sink); placed in the mesh's shardings when given."""
    return io.build_params(self.fam.plan(self.cfg), self.files, self.expected, dtype,
                           target_shardings(self.abstract, mesh, rules), progress=progress,
                           resolved=self.resolved, **kw)

  def unused(self) -> list[str]:
    """Tensors read by no parameter, besides the expected ones (LM heads, decoders, vision towers)."""
    ignored = self.fam.IGNORED
    out = [k for k in self.files.unused() if not k[len(self.files.prefix):].startswith(ignored)
           and not k.startswith(ignored)]
    if out:
      logger.warning("%s: %d tensors were not used: %s", self.path, len(out), out[:20])
    return out


def convert_hf_dir(path: str, dtype=jnp.float32, mesh=None, rules=(), allow_pickle: bool = False,
                   progress: bool = False, adapt=None):
  """(family, cfg, module, params, unused keys) straight from a Hugging Face directory."""
  conv = Conversion.prepare(path, dtype, allow_pickle, adapt)
  params = conv.run(dtype, mesh, rules, progress)
  return conv.fam, conv.cfg, conv.module, params, conv.unused()


def load_hf_text_model(path: str, dtype=jnp.float32, mesh=None, rules=(), allow_pickle: bool = False, adapt=None):
  """(module, params) from a Hugging Face directory or a converted one (which holds what its conversion
  was asked for: `adapt` applies to Hugging Face directories); see the module docstring."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"text model path {path!r} is not a directory. Fix: point it at a local Hugging Face "
                            "model directory or at the output of `python -m lidit_jax.convert hf-text`.")
  if _converted_text(path):
    return orbax_io.load_converted(path, dtype, mesh, rules)
  _, _, module, params, _ = convert_hf_dir(path, dtype, mesh, rules, allow_pickle, adapt=adapt)
  return module, params
