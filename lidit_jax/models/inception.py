"""The FID Inception v3 in Flax Linen, NHWC: the TensorFlow 2015-12-05 graph that FID is defined on, as pytorch-fid
ports it (`InceptionV3(output_blocks=[3], use_fid_inception=True)`), returning the 2048 pool3 features.

It is torchvision's Inception v3 with the FID variants of its blocks: every pooling branch of the A, C and first E
blocks averages over the valid taps only (TensorFlow's padding does not count), and the last E block max-pools
there. BasicConv = conv without bias -> BatchNorm (eps 1e-3, inference: running statistics) -> ReLU. The BatchNorm
statistics are plain parameters (`bn/{scale,bias,mean,var}`: no `batch_stats` collection), and submodule names
follow the PyTorch state-dict keys (`Mixed_5b/branch5x5_1/conv` is `Mixed_5b.branch5x5_1.conv`), so conversion
(`convert/fid_inception.py`) is a rename plus OIHW -> HWIO.

Input: images [N, H, W, 3] in [0, 1], any size. `resize_input` scales them to 299 x 299 bilinearly as torch's
`F.interpolate(mode="bilinear", align_corners=False)` does (no antialiasing), as pytorch-fid does; then
`normalization` maps them to the network's range: "pytorch_fid" 2x - 1, "tensorflow" (255x - 128) / 128 (the TF
graph's own, which clean-fid feeds). Convolutions run at HIGHEST precision by default: FID compares against float32
references, and TPU / GPU default precision (bf16 passes, TF32) moves the features by more than that.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidit_jax.models import layers

Dtype = layers.Dtype
EPS = 1e-3  # every BatchNorm of the TF graph
SIZE = 299  # the input size the graph was trained at
NORMALIZATIONS = ("pytorch_fid", "tensorflow")


class FrozenBatchNorm(nn.Module):
  """BatchNorm at inference: (x - mean) / sqrt(var + eps) * scale + bias over the channel axis."""
  eps: float = EPS

  @nn.compact
  def __call__(self, x_BHWC):
    c = x_BHWC.shape[-1]
    param = lambda name, init: self.param(name, layers.logical(init, ("conv_out",)), (c,), jnp.float32)
    scale, bias = param("scale", nn.initializers.ones_init()), param("bias", nn.initializers.zeros_init())
    mean, var = param("mean", nn.initializers.zeros_init()), param("var", nn.initializers.ones_init())
    mult = scale * jax.lax.rsqrt(var + self.eps)
    return (x_BHWC - mean.astype(x_BHWC.dtype)) * mult.astype(x_BHWC.dtype) + bias.astype(x_BHWC.dtype)


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm -> ReLU; `padding` (rows, columns) of zeros on each side, as torch's."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x_BHWC):
    (ph, pw), s = self.padding, self.stride
    x = nn.Conv(self.features, self.kernel, strides=(s, s), padding=((ph, ph), (pw, pw)), use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision, name="conv",
                kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")))(x_BHWC)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def avg_pool_valid(x_BHWC):
  """3x3 stride-1 average over the taps inside the image (torch: count_include_pad=False; TensorFlow's SAME)."""
  return nn.avg_pool(x_BHWC, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool(x_BHWC, stride: int = 2, pad: int = 0):
  return nn.max_pool(x_BHWC, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """Mixed_5b/c/d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | valid-average pool -> 1x1."""
  pool_features: int
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k=(1, 1), p=(0, 0), name=None: BasicConv(f, k, 1, p, self.dtype, self.precision, name=name)
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(64, (5, 5), (2, 2), name="branch5x5_2")(conv(48, name="branch5x5_1")(x))
    b3 = conv(64, name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, name="branch_pool")(avg_pool_valid(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (35 -> 17): 3x3 stride 2 | 1x1 -> 3x3 -> 3x3 stride 2 | 3x3 max pool stride 2."""
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k=(1, 1), s=1, p=(0, 0), name=None: BasicConv(f, k, s, p, self.dtype, self.precision, name=name)
    b3 = conv(384, (3, 3), 2, name="branch3x3")(x)
    bd = conv(64, name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), 1, (1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), 2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..e: 1x1 | factorised 7x7 | twice-factorised 7x7 | valid-average pool -> 1x1."""
  channels_7x7: int
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k=(1, 1), p=(0, 0), name=None: BasicConv(f, k, 1, p, self.dtype, self.precision, name=name)
    c7 = self.channels_7x7
    row = dict(k=(1, 7), p=(0, 3))  # 1x7: pads columns
    col = dict(k=(7, 1), p=(3, 0))
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(c7, **row, name="branch7x7_2")(b7)
    b7 = conv(192, **col, name="branch7x7_3")(b7)
    bd = conv(c7, name="branch7x7dbl_1")(x)
    bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = conv(192, **row, name="branch7x7dbl_5")(bd)
    bp = conv(192, name="branch_pool")(avg_pool_valid(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (17 -> 8): 1x1 -> 3x3 stride 2 | 1x1 -> 1x7 -> 7x1 -> 3x3 stride 2 | 3x3 max pool stride 2."""
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k=(1, 1), s=1, p=(0, 0), name=None: BasicConv(f, k, s, p, self.dtype, self.precision, name=name)
    b3 = conv(320, (3, 3), 2, name="branch3x3_2")(conv(192, name="branch3x3_1")(x))
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), 1, (0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), 1, (3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), 2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b / 7c: 1x1 | 1x1 -> (1x3 | 3x1) | 1x1 -> 3x3 -> (1x3 | 3x1) | pool -> 1x1. `pool`: "avg" (valid taps,
  Mixed_7b) or "max" (Mixed_7c: the FID graph's quirk, kept for its features)."""
  pool: str = "avg"
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k=(1, 1), p=(0, 0), name=None: BasicConv(f, k, 1, p, self.dtype, self.precision, name=name)
    split = lambda y, a, b: jnp.concatenate([conv(384, (1, 3), (0, 1), name=a)(y),
                                             conv(384, (3, 1), (1, 0), name=b)(y)], axis=-1)
    b1 = conv(320, name="branch1x1")(x)
    b3 = split(conv(384, name="branch3x3_1")(x), "branch3x3_2a", "branch3x3_2b")
    bd = conv(448, name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), (1, 1), name="branch3x3dbl_2")(bd)
    bd = split(bd, "branch3x3dbl_3a", "branch3x3dbl_3b")
    pooled = avg_pool_valid(x) if self.pool == "avg" else max_pool(x, stride=1, pad=1)
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInception(nn.Module):
  """Images [N, H, W, 3] in [0, 1] -> pool3 features [N, 2048] float32 (see the module docstring)."""
  resize_input: bool = True
  normalization: str = "pytorch_fid"
  dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images_BHWC):
    assert images_BHWC.ndim == 4 and images_BHWC.shape[-1] == 3, images_BHWC.shape
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"FIDInception normalization {self.normalization!r} is not one of {NORMALIZATIONS}")
    x = images_BHWC.astype(jnp.float32)
    b = x.shape[0]
    if self.resize_input and x.shape[1:3] != (SIZE, SIZE):
      x = jax.image.resize(x, (b, SIZE, SIZE, 3), "linear", antialias=False)
    x = 2 * x - 1 if self.normalization == "pytorch_fid" else (x * 255 - 128) / 128
    x = x.astype(self.dtype)

    kw = dict(dtype=self.dtype, precision=self.precision)
    conv = lambda f, k, s=1, p=(0, 0), name=None: BasicConv(f, k, s, p, name=name, **kw)
    x = conv(32, (3, 3), 2, name="Conv2d_1a_3x3")(x)  # 299 -> 149
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # -> 147
    x = conv(64, (3, 3), p=(1, 1), name="Conv2d_2b_3x3")(x)
    x = max_pool(x)  # -> 73
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # -> 71
    x = max_pool(x)  # -> 35
    x = InceptionA(32, name="Mixed_5b", **kw)(x)
    x = InceptionA(64, name="Mixed_5c", **kw)(x)
    x = InceptionA(64, name="Mixed_5d", **kw)(x)
    x = InceptionB(name="Mixed_6a", **kw)(x)  # -> 17
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name, **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)  # -> 8
    x = InceptionE("avg", name="Mixed_7b", **kw)(x)
    x = InceptionE("max", name="Mixed_7c", **kw)(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # adaptive average pool to 1x1: [N, 2048]
