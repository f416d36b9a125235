"""A parameter in PyTorch's layout and back, from its logical axis names: the view the exporter writes
(`export.torch_layout`) and LoRA factors live in (`lora`).

A Dense kernel [in..., out...] is a torch Linear weight [out, in]: its first axis is `in`, or all but the last when
`heads` leads (an attention output projection [H, K, D]), the rest `out` (q / k / v [D, H, K] -> [H*K, D]). A conv
kernel, HWIO with no logical names on its spatial axes, is OIHW.
"""
from __future__ import annotations

import math


def is_conv(names, ndim: int) -> bool:
  return ndim == 4 and tuple(names[:2]) == (None, None)


def in_axes(names) -> int:
  """How many leading axes of a Dense kernel are its input: all but the last when `heads` leads (an attention output
  [H, K, D], or [H*K, D] when the heads are already flat: the U-Net's), else the first."""
  return len(names) - 1 if names and names[0] == "heads" else 1


def to_torch(names, kernel):
  """Our kernel (numpy or jax) -> torch's weight: [out, in], or OIHW for a conv."""
  if is_conv(names, kernel.ndim):
    return kernel.transpose(3, 2, 0, 1)
  ins = in_axes(names)
  return kernel.reshape(math.prod(kernel.shape[:ins]), -1).T


def from_torch(names, weight, shape):
  """Torch's weight -> our kernel of `shape` (the inverse of `to_torch`)."""
  if is_conv(names, len(shape)):
    return weight.transpose(2, 3, 1, 0)
  return weight.T.reshape(shape)


def module_key(path: tuple[str, ...], layer: int | None = None) -> str:
  """The torch-style module name of a parameter at `path` (its leaf dropped): "denoiser.final_proj"; a scanned
  stack's layer `layer` is numbered after its scan (`blocks`, or `layers`: Lumina 2's), as the unrolled model names
  it ("denoiser.blocks.3.block.self_attn.query"). `export safetensors` keys and LoRA files are named from it."""
  mods = list(path[:-1])
  if layer is not None:
    scan = next((m for m in mods if m in ("blocks", "layers")), None)
    if scan is None:
      raise ValueError(f"{'/'.join(path)}: a stacked parameter outside a `blocks` or `layers` scan has no documented key")
    mods.insert(mods.index(scan) + 1, str(layer))
  return ".".join(mods)
