"""Shared building blocks: dense layers with logical axes, norms, masked attention, MLPs, RoPE, embeddings.

Every parameter carries logical axis names (see `sharding.py` for the logical -> mesh rules):
  embed   model width            heads   attention heads        kv     per-head width
  mlp     hidden width of an MLP vocab   vocabulary             layers scanned depth
  cond    conditioning width (input side of modulation layers)
Shape suffixes in names: B batch, L/S sequence, D width, H heads, K per-head width.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Dtype = Any

# model.remat: what a rematerialised block keeps for the backward pass (the rest is recomputed)
REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
default_init = nn.initializers.xavier_uniform()


def logical(init: Callable, axes: Sequence[str | None]) -> Callable:
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Activation sharding hint at block boundaries; a no-op without a mesh."""
  return nn.with_logical_constraint(x, tuple(axes))


def Dense(features: int, axes: tuple[str | None, str | None] = ("embed", "mlp"), use_bias: bool = True,
          zero_init: bool = False, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
  """nn.Dense whose kernel and bias carry logical axis names (`axes` = (in, out))."""
  init = nn.initializers.zeros_init() if zero_init else default_init
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=logical(init, axes), bias_init=logical(nn.initializers.zeros_init(), (axes[1],)))


class RMSNorm(nn.Module):
  """RMSNorm over the last axis. `unit_offset` stores w - 1 (Gemma style: scale = 1 + w)."""
  eps: float = 1e-6
  axis_name: str | None = "embed"
  use_scale: bool = True
  unit_offset: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.use_scale:
      init = nn.initializers.zeros_init() if self.unit_offset else nn.initializers.ones_init()
      w = self.param("scale", logical(init, (self.axis_name,)), (x.shape[-1],), jnp.float32)
      y = y * (1.0 + w if self.unit_offset else w)
    return y.astype(self.dtype)


def layer_norm(dtype: Dtype = jnp.float32, affine: bool = False, name: str | None = None):
  """LayerNorm; without affine parameters when modulation supplies scale and shift."""
  return nn.LayerNorm(epsilon=1e-6, use_scale=affine, use_bias=affine, dtype=dtype,
                      param_dtype=jnp.float32, name=name,
                      scale_init=logical(nn.initializers.ones_init(), ("embed",)),
                      bias_init=logical(nn.initializers.zeros_init(), ("embed",)))


def attention_mask(q_valid_BL: jax.Array | None, k_valid_BS: jax.Array | None,
                   causal: bool = False, lq: int | None = None, lk: int | None = None) -> jax.Array | None:
  """Boolean [B, 1, L, S] mask: query i may attend key j. Padding of queries is handled by the caller
  (their outputs are discarded or zeroed), so only keys are masked here."""
  mask = None
  if k_valid_BS is not None:
    mask = k_valid_BS.astype(bool)[:, None, None, :]
  if causal:
    lq = lq if lq is not None else q_valid_BL.shape[1]
    lk = lk if lk is not None else k_valid_BS.shape[1]
    tri = jnp.tril(jnp.ones((lq, lk), bool))[None, None]
    mask = tri if mask is None else mask & tri
  return mask


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: tuple = ()) -> jax.Array:
  """Inverse frequencies [K/2]. `scaling` is a tuple of (name, value) pairs: rope_type "linear"
  (factor) or "llama3" (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  s = dict(scaling)
  kind = s.get("rope_type", "default")
  if kind == "linear":
    return inv_freq / s["factor"]
  if kind == "llama3":
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    ramp = jnp.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - ramp) * inv_freq / factor + ramp * inv_freq
  assert kind == "default", f"unknown rope_type {kind!r}"
  return inv_freq


def rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float = 10000.0, scaling: tuple = ()) -> jax.Array:
  """Rotary embedding, half-split convention (as in Llama's Hugging Face implementation)."""
  inv_freq = rope_frequencies(x_BLHK.shape[-1], theta, scaling)
  angles = positions_BL[..., None].astype(jnp.float32) * inv_freq  # [B, L, K/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_BLHK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)


def softcapped_attention(q_BLHK, k_BSGK, v_BSGK, mask, scale: float, softcap: float):
  """Attention with tanh logit soft-capping (Gemma 2), which fused kernels do not offer. GQA groups
  consecutive query heads on one key/value head, as `jax.nn.dot_product_attention` does."""
  b, l, h, kd = q_BLHK.shape
  g = k_BSGK.shape[2]
  q = q_BLHK.reshape(b, l, g, h // g, kd)
  logits = jnp.einsum("blgrk,bsgk->bgrls", q, k_BSGK, preferred_element_type=jnp.float32) * scale
  logits = jnp.tanh(logits / softcap) * softcap
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSGK.dtype)
  return jnp.einsum("bgrls,bsgk->blgrk", probs, v_BSGK).reshape(b, l, h, kd)


def _block(n: int) -> int:
  return next((b for b in (512, 256, 128) if n % b == 0), n)


def splash_attention(q_BLHK, k_BSHK, v_BSHK, key_valid_BS=None, interpret: bool = False, scale: float | None = None):
  """Pallas splash attention (TPU; `interpret=True` runs the same kernel on any backend, for tests); `scale` of
  the logits, 1 / sqrt(head_dim) by default.
  Key padding is expressed as segment ids (queries 1, valid keys 1, masked keys 0). Under a mesh the kernel
  runs per shard (shard_map over the batch and head axes the logical rules give)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # local: TPU kernels, when used
  b, l, h, k = q_BLHK.shape
  s = k_BSHK.shape[1]
  valid = jnp.ones((b, s), jnp.int32) if key_valid_BS is None else key_valid_BS.astype(jnp.int32)

  def local(q, key, v, kv_ids):
    heads = q.shape[2]
    sizes = sa.BlockSizes(block_q=_block(l), block_kv=_block(s), block_kv_compute=_block(s),
                          block_q_dkv=_block(l), block_kv_dkv=_block(s), block_kv_dkv_compute=_block(s),
                          block_q_dq=_block(l), block_kv_dq=_block(s))
    kernel = sa.make_splash_mha(sa.MultiHeadMask([sa.FullMask((l, s))] * heads), head_shards=1, q_seq_shards=1,
                                block_sizes=sizes, interpret=interpret)

    def one(q1, k1, v1, ids):  # the kernel takes [heads, length, dim] and does not scale the queries
      seg = sa.SegmentIds(q=jnp.ones((l,), jnp.int32), kv=ids)
      return kernel(jnp.swapaxes(q1, 0, 1) * (k ** -0.5 if scale is None else scale), jnp.swapaxes(k1, 0, 1),
                    jnp.swapaxes(v1, 0, 1), segment_ids=seg)
    return jnp.swapaxes(jax.vmap(one)(q, key, v, kv_ids), 1, 2)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BLHK, k_BSHK, v_BSHK, valid)
  batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
  # an axis its mesh axes do not divide (the batch of 1 that initialisation traces) is not split
  split = lambda axes, n: axes if n % math.prod(mesh.shape[a] for a in
                                               ((axes,) if isinstance(axes, str) else axes or ())) == 0 else None
  batch, heads = split(batch, b), split(heads, h)
  spec = P(batch, None, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec,
                       check_vma=False)(q_BLHK, k_BSHK, v_BSHK, valid)


def attend(q_BLHK, k_BSGK, v_BSGK, mask=None, scale: float | None = None, implementation: str | None = None,
           softcap: float | None = None):
  """The attention kernel switch every model uses: XLA (`jax.nn.dot_product_attention`) by default, cuDNN on
  GPU ("cudnn"), Pallas splash on TPU ("splash"; "splash_interpret" runs it anywhere, for tests; XLA's where a
  length is not a multiple of the kernel's 128-token block: a U-Net's 8 x 8 level on TPU), or the soft-capped form. `mask`: boolean [B, 1, L, S]; a query row with no key to attend returns zeros, never NaN."""
  if softcap:
    out = softcapped_attention(q_BLHK, k_BSGK, v_BSGK, mask, scale if scale is not None else q_BLHK.shape[-1] ** -0.5,
                               softcap)
  elif implementation in ("splash", "splash_interpret") and not (q_BLHK.shape[1] % 128 or k_BSGK.shape[1] % 128):
    if k_BSGK.shape[2] != q_BLHK.shape[2]:  # grouped-query (Lumina 2's Gemma-style 24 / 8): query head i reads
      r = q_BLHK.shape[2] // k_BSGK.shape[2]  # kv head i // r, as XLA's and transformers' repeat_kv
      k_BSGK, v_BSGK = jnp.repeat(k_BSGK, r, axis=2), jnp.repeat(v_BSGK, r, axis=2)
    if mask is not None and mask.shape[2] != 1:
      raise ValueError("splash attention takes key-padding masks only (not causal or per-query masks)")
    key_valid = None if mask is None else jnp.broadcast_to(mask[:, 0, 0, :], (q_BLHK.shape[0], k_BSGK.shape[1]))
    out = splash_attention(q_BLHK, k_BSGK, v_BSGK, key_valid, interpret=implementation == "splash_interpret",
                           scale=scale)
  else:
    xla_or = None if implementation in ("splash", "splash_interpret") else implementation  # splash: untileable
    if xla_or == "cudnn" and mask is not None and mask.shape[2] != q_BLHK.shape[1]:
      # cuDNN's kernel takes the mask as a bias of full query length (a key-padding [B, 1, 1, S] is refused)
      mask = jnp.broadcast_to(mask, (*mask.shape[:2], q_BLHK.shape[1], mask.shape[3]))
    out = jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, mask=mask, scale=scale, implementation=xla_or)
  if mask is not None:
    has_key = jnp.any(mask, axis=-1)  # [B, 1, L]
    has_key = jnp.broadcast_to(has_key, (out.shape[0], 1, out.shape[1]))[:, 0, :, None, None]
    out = jnp.where(has_key, out, 0)
  return out


def relu_linear_attention(q_BNGD, k_BNGD, v_BNGD, eps: float = 1e-15):
  """Sana's / EfficientViT's linear attention per head group G, in float32: relu(q) (v; 1) relu(k)^T, each output
  divided by its ones-row (the normaliser), O(N d^2) instead of O(N^2 d)."""
  q, k = nn.relu(q_BNGD.astype(jnp.float32)), nn.relu(k_BNGD.astype(jnp.float32))
  v = v_BNGD.astype(jnp.float32)
  v1 = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
  out = jnp.einsum("bgij,bngj->bngi", jnp.einsum("bngi,bngj->bgij", v1, k), q)
  return out[..., :-1] / (out[..., -1:] + eps)


class Attention(nn.Module):
  """Multi-head (grouped-query) attention; self-attention when `context` is None.

  Masks are boolean [B, 1, L, S] (True = may attend). A query row with no key to attend returns zeros,
  never NaN, so fully padded prompts are safe.
  """
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  qk_norm: bool = False
  use_bias: bool = False
  out_bias: bool | None = None  # default: use_bias (Qwen2 has q/k/v biases but none on the output)
  rope_theta: float | None = None
  rope_scaling: tuple = ()
  scale: float | None = None  # default 1/sqrt(head_dim)
  logit_softcap: float | None = None
  norm_eps: float = 1e-6
  # Kernels in PyTorch's [out, in] order (q/k/v [H, K, D], out [D, H, K]): converted checkpoints then need
  # no transposes, only reshapes. XLA picks the matmul layout either way.
  torch_layout: bool = False
  dtype: Dtype = jnp.float32
  # None / "xla" everywhere; "cudnn" on GPU; "splash" on TPU ("splash_interpret": the same kernel on any
  # backend, for tests). See model.attention_implementation.
  implementation: str | None = None

  @nn.compact
  def __call__(self, x_BLD, context_BSD=None, mask=None, positions_BL=None):
    d = x_BLD.shape[-1]
    h = self.num_heads
    kvh = self.num_kv_heads or h
    k_dim = self.head_dim or d // h
    ctx = x_BLD if context_BSD is None else context_BSD

    def proj(name, inp, heads):
      if self.torch_layout:
        return HeadsDense((heads, k_dim, inp.shape[-1]), "...d,hkd->...hk", ("heads", "kv", "embed"),
                          self.use_bias, self.dtype, name=name)(inp)
      return HeadsDense((inp.shape[-1], heads, k_dim), "...d,dhk->...hk", ("embed", "heads", "kv"),
                        self.use_bias, self.dtype, name=name)(inp)

    q = proj("query", x_BLD, h)
    k = proj("key", ctx, kvh)
    v = proj("value", ctx, kvh)
    if self.qk_norm:
      q = RMSNorm(self.norm_eps, axis_name="kv", dtype=self.dtype, name="q_norm")(q)
      k = RMSNorm(self.norm_eps, axis_name="kv", dtype=self.dtype, name="k_norm")(k)
    if self.rope_theta is not None:
      assert positions_BL is not None, "rope needs positions"
      q = rope(q, positions_BL, self.rope_theta, self.rope_scaling)
      k = rope(k, positions_BL, self.rope_theta, self.rope_scaling)
    out = attend(q, k, v, mask, self.scale, self.implementation, self.logit_softcap)
    out_bias = self.use_bias if self.out_bias is None else self.out_bias
    if self.torch_layout:
      return HeadsDense((d, h, k_dim), "...hk,dhk->...d", ("embed", "heads", "kv"), out_bias, self.dtype,
                        name="out")(out)
    return HeadsDense((h, k_dim, d), "...hk,hkd->...d", ("heads", "kv", "embed"), out_bias, self.dtype,
                      name="out")(out)


class HeadsDense(nn.Module):
  """A projection written as an einsum with the kernel in its final shape (into or out of attention heads,
  or a plain matrix in either orientation), so its logical axis names always match its rank (the kernel
  of an nn.DenseGeneral is born flat). `equation` is "...<input>,<kernel>-><output>"; the bias has the
  output's shape. Xavier-uniform on the matrix view (fan in = contracted dims, fan out = output dims)."""
  kernel_shape: tuple[int, ...]
  equation: str
  axes: tuple[str, ...]
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel_letters = self.equation.split(",")[1].split("->")[0]
    out_letters = self.equation.split("->")[1].replace("...", "")
    size = dict(zip(kernel_letters, self.kernel_shape))
    fan_out = math.prod(size[c] for c in out_letters)
    fan_in = math.prod(self.kernel_shape) // fan_out
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -limit, limit)
    w = self.param("kernel", logical(init, self.axes), self.kernel_shape, jnp.float32)
    y = jnp.einsum(self.equation, x.astype(self.dtype), w.astype(self.dtype))
    if self.use_bias:
      axis_of = dict(zip(kernel_letters, self.axes))
      y = y + self.param("bias", logical(nn.initializers.zeros_init(), tuple(axis_of[c] for c in out_letters)),
                         tuple(size[c] for c in out_letters), jnp.float32).astype(self.dtype)
    return y


class Mlp(nn.Module):
  """Two-layer MLP with tanh-GELU (DiT / refiner FFN)."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    y = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    y = nn.gelu(y, approximate=True)
    return Dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(y)


class GatedMlp(nn.Module):
  """SwiGLU / GeGLU MLP of decoder LLMs: down(act(gate(x)) * up(x)). `torch_layout`: kernels [out, in]."""
  hidden: int
  activation: str = "silu"
  use_bias: bool = False
  torch_layout: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    act = {"silu": nn.silu, "gelu_tanh": lambda v: nn.gelu(v, approximate=True),
           "gelu": lambda v: nn.gelu(v, approximate=False)}[self.activation]

    def dense(features, axes, name, inp):
      if self.torch_layout:
        return HeadsDense((features, inp.shape[-1]), "...i,oi->...o", axes[::-1], self.use_bias, self.dtype,
                          name=name)(inp)
      return Dense(features, axes, self.use_bias, dtype=self.dtype, name=name)(inp)

    g = dense(self.hidden, ("embed", "mlp"), "gate_proj", x)
    u = dense(self.hidden, ("embed", "mlp"), "up_proj", x)
    return dense(d, ("mlp", "embed"), "down_proj", act(g) * u)


def timestep_features(t_B: jax.Array, dim: int, max_period: float = 10000.0, scale: float = 1000.0):
  """Sinusoidal features of t in [0, 1] (scaled to [0, 1000] as in DiT)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t_B.astype(jnp.float32) * scale)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
  width: int
  freq_dim: int = 256
  dtype: Dtype = jnp.float32
  scale: float = 1000.0  # t's multiplier before the sinusoids (1: t is already in diffusers' timesteps)

  @nn.compact
  def __call__(self, t_B):
    x = timestep_features(t_B, self.freq_dim, scale=self.scale)
    x = Dense(self.width, ("cond", "mlp"), dtype=self.dtype, name="fc1")(x)
    return Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(nn.silu(x))


def modulate(x_BLD, shift_BD, scale_BD):
  return x_BLD * (1.0 + scale_BD[:, None, :]) + shift_BD[:, None, :]


def masked_mean(x_BLD: jax.Array, mask_BL: jax.Array) -> jax.Array:
  """Mean over valid tokens; zeros (not NaN) for a row with no valid token."""
  m = mask_BL.astype(jnp.float32)[..., None]
  total = jnp.sum(x_BLD.astype(jnp.float32) * m, axis=1)
  return (total / jnp.maximum(jnp.sum(m, axis=1), 1.0)).astype(x_BLD.dtype)


def patchify(x_BHWC, p: int):
  """[B, H, W, C] -> [B, H/p, W/p, p p C]: each patch's (row, column, channel) values in that order, as diffusers'
  DiTs flatten them (a conv with stride p, or a Linear over the patch)."""
  b, h, w, c = x_BHWC.shape
  return x_BHWC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * c)


def unpatchify(x_BLP, grid: tuple[int, int], p: int):
  """The inverse of `patchify` from tokens [B, gh gw, p p C] -> [B, gh p, gw p, C]."""
  (gh, gw), b = grid, x_BLP.shape[0]
  c = x_BLP.shape[-1] // (p * p)
  return x_BLP.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * p, gw * p, c)


def sincos_2d(h: int, w: int, dim: int, scale_h: float = 1.0, scale_w: float = 1.0, x_first: bool = False) -> jax.Array:
  """Fixed 2-D sine-cosine position table [h*w, dim] (half the channels per spatial axis) at positions
  arange(side) * scale; `x_first`: the column's half first (diffusers' PixArt / SD3 layout), else the row's."""
  assert dim % 4 == 0, f"sin-cos positions need a width divisible by 4, got {dim}"
  def axis_table(n, d, scale):
    omega = 1.0 / 10000 ** (jnp.arange(d // 2, dtype=jnp.float32) / (d // 2))
    args = (jnp.arange(n, dtype=jnp.float32) * jnp.float32(scale))[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  ty = axis_table(h, dim // 2, scale_h)[:, None, :].repeat(w, axis=1)
  tx = axis_table(w, dim // 2, scale_w)[None, :, :].repeat(h, axis=0)
  return jnp.concatenate([tx, ty] if x_first else [ty, tx], axis=-1).reshape(h * w, dim)
