"""pytorch-fid's FID Inception weights -> `models.inception.FIDInception` parameters.

`load_fid_inception(path, allow_pickle=False)` reads the file a user brings: pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (a torch pickle: read only with `allow_pickle=True`, through torch's
weights-only loader), or a `.safetensors` file of the same tensors. Two namings are accepted: the released file's
(torchvision's Inception3 attribute names, `Mixed_5b.branch1x1.conv.weight`, plus its unused 1008-way `fc`), and a
`pytorch_fid.inception.InceptionV3([3]).state_dict()` (`blocks.2.0.branch1x1.conv.weight`). Our names mirror the
first, so the plan is derived from the module's own parameter tree: conv kernels OIHW -> HWIO, BatchNorm
weight / bias / running_mean / running_var -> bn/scale / bias / mean / var.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from lidit_jax.cli import NotFound
from lidit_jax.convert import safetensors_io as io
from lidit_jax.models import inception

# pytorch-fid's InceptionV3 groups the layers in `blocks` (Sequentials; the max pools hold no tensors)
BLOCKS = (("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"), ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
          ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
          ("Mixed_7a", "Mixed_7b", "Mixed_7c"))
IN_BLOCKS = {name: f"blocks.{i}.{j}" for i, names in enumerate(BLOCKS) for j, name in enumerate(names)}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_FIX = ("point at pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or a .safetensors file of its tensors, or of "
        "pytorch_fid.inception.InceptionV3([3]).state_dict()); torchvision's ImageNet Inception is another network")
_kernel = io.with_inverse(lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))  # OIHW <-> HWIO


def make_module(resize_input: bool = True, normalization: str = "pytorch_fid", dtype=jnp.float32):
  return inception.FIDInception(resize_input=resize_input, normalization=normalization, dtype=dtype)


def abstract_params(module: inception.FIDInception):
  """Boxed abstract params (shapes only: the network at 299 x 299, nothing computed)."""
  x = jax.ShapeDtypeStruct((1, inception.SIZE, inception.SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda a: module.init(jax.random.key(0), a), x)["params"]


def plan(expected) -> dict[tuple[str, ...], io.Source]:
  """{param path: Source}: the released file's key, else pytorch-fid's `blocks.i.j` one."""
  p = {}
  for path in expected:
    key = ".".join(path[:-1]) + "." + _LEAF[path[-1]]
    transform = _kernel if path[-1] == "kernel" else io._identity
    p[path] = io.Source.one((key, f"{IN_BLOCKS[path[0]]}{key[len(path[0]):]}"), transform)
  return p


def _ignored(key: str) -> bool:
  """Tensors of the file that FID does not use: the classifier, and BatchNorm's step counters."""
  return key in ("fc.weight", "fc.bias") or key.endswith(".num_batches_tracked")


def load_fid_inception(path: str, allow_pickle: bool = False, resize_input: bool = True,
                       normalization: str = "pytorch_fid", dtype=jnp.float32):
  """(FIDInception module, params: float32 arrays) from the weights file at `path`; see the module docstring."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise NotFound(f"Inception weights {path} do not exist. Fix: point --inception at pytorch-fid's "
                   "pt_inception-2015-12-05-6726825d.pth (with --allow-pickle) or its .safetensors conversion")
  if os.path.isfile(path) and not path.endswith((".safetensors", ".pth", ".pt", ".bin")):
    raise ValueError(f"Inception weights {path}: not a .pth or .safetensors file. Fix: point at pytorch-fid's "
                     "pt_inception-2015-12-05-6726825d.pth or a .safetensors file of its tensors")
  files = io.CheckpointFiles(path, allow_pickle=allow_pickle)
  module = make_module(resize_input, normalization, dtype)
  expected = io.flatten_shapes(io.strip_boxes(abstract_params(module)))
  plan_ = plan(expected)
  try:
    resolved = io.check_plan(plan_, files, expected)
  except io.ConversionError as e:  # its generic fix speaks of config.json, which this network has none of
    raise io.ConversionError(str(e).rsplit("\nFix:", 1)[0] + f"\nFix: {_FIX}") from None
  planned = {k for names in resolved.values() for k in names}
  unknown = sorted(k for k in files.keys() if k not in planned and not _ignored(k))
  if unknown:
    raise io.ConversionError(f"{path}: {len(unknown)} tensors are not the FID Inception's: {unknown[:8]}. "
                             f"Fix: {_FIX}")
  return module, io.build_params(plan_, files, expected, jnp.float32, resolved=resolved)
