"""Masks, refiner semantics, and the denoiser's text conditioning on tiny random models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidit_jax import configs
from lidit_jax.objectives import flow, guidance
from lidit_jax import model as model_lib
from lidit_jax.models import dit as dit_lib, layers, llm, refiner

from conftest import tiny_config


def perturb(params, seed=0, scale=0.2):
  """Random values everywhere, zero-initialised gates included, so that no path is trivially off."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def unboxed_init(module, *args, **kw):
  import flax.linen as nn
  return nn.unbox(module.init(jax.random.key(0), *args, **kw))["params"]


# ---------------------------------------------------------------------------- LLM tower

@pytest.fixture(scope="module")
def tower():
  cfg = llm.tiny_llama(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2)
  m = llm.DecoderLM(cfg)
  ids = jnp.ones((1, 6), jnp.int32)
  return m, unboxed_init(m, ids, ids)


def test_tower_returns_every_layer(tower):
  m, p = tower
  ids = jnp.arange(2 * 7).reshape(2, 7) % 50
  h = m.apply({"params": p}, ids, jnp.ones_like(ids))
  assert h.shape == (4, 2, 7, 32)  # embeddings + 3 layers


def test_tower_padding_does_not_change_valid_tokens(tower):
  m, p = tower
  ids = jnp.array([[5, 6, 7, 8]])
  ref = m.apply({"params": p}, ids, jnp.ones_like(ids))
  # right padding with junk ids
  ids_r = jnp.array([[5, 6, 7, 8, 33, 44, 11]])
  mask_r = jnp.array([[1, 1, 1, 1, 0, 0, 0]])
  out_r = m.apply({"params": p}, ids_r, mask_r)
  np.testing.assert_allclose(out_r[:, :, :4], ref, atol=1e-5)
  # left padding: positions count valid tokens, so the same features come out
  ids_l = jnp.array([[9, 9, 5, 6, 7, 8]])
  mask_l = jnp.array([[0, 0, 1, 1, 1, 1]])
  out_l = m.apply({"params": p}, ids_l, mask_l)
  np.testing.assert_allclose(out_l[:, :, 2:], ref, atol=1e-5)


def test_tower_is_causal(tower):
  m, p = tower
  a = m.apply({"params": p}, jnp.array([[5, 6, 7, 8]]), jnp.ones((1, 4)))
  b = m.apply({"params": p}, jnp.array([[5, 6, 7, 9]]), jnp.ones((1, 4)))
  np.testing.assert_allclose(a[:, :, :3], b[:, :, :3], atol=1e-6)
  assert float(jnp.abs(a[-1, :, 3] - b[-1, :, 3]).max()) > 1e-3


def test_fully_padded_rows_give_no_nan(tower):
  m, p = tower
  out = m.apply({"params": p}, jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5)))
  assert bool(jnp.all(jnp.isfinite(out)))
  attn = layers.Attention(2)
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  mask = layers.attention_mask(None, jnp.zeros((2, 3), bool))
  ap = unboxed_init(attn, x, mask=mask)
  y = attn.apply({"params": ap}, x, mask=mask)
  assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.abs(y).max()) == 0.0


# ---------------------------------------------------------------------------- token refiner

def refiner_inputs(b=2, l=6, e=12, d=16):
  k = jax.random.split(jax.random.key(3), 2)
  feats = jax.random.normal(k[0], (b, l, e))
  valid = jnp.ones((b, l), bool)
  t_emb = jax.random.normal(k[1], (b, d))
  return feats, valid, valid, t_emb


@pytest.mark.parametrize("causal", [False, True])
def test_refiner_bidirectional_vs_causal(causal):
  r = refiner.TokenRefiner(16, depth=2, num_heads=2, causal=causal)
  feats, valid, pool, t_emb = refiner_inputs()
  # Pool over the first token only, so changing the last token reaches earlier tokens through attention alone.
  pool = jnp.zeros_like(valid).at[:, 0].set(True)
  params = perturb(unboxed_init(r, feats, valid, pool, t_emb))
  out, _ = r.apply({"params": params}, feats, valid, pool, t_emb)
  feats2 = feats.at[:, -1].add(1.0)  # change only the last token
  out2, _ = r.apply({"params": params}, feats2, valid, pool, t_emb)
  earlier_change = float(jnp.abs(out[:, :-1] - out2[:, :-1]).max())
  assert float(jnp.abs(out[:, -1] - out2[:, -1]).max()) > 1e-3
  if causal:
    assert earlier_change < 1e-6
  else:
    assert earlier_change > 1e-3


def test_zero_init_gates_make_refiner_identity():
  feats, valid, pool, t_emb = refiner_inputs()
  deep = refiner.TokenRefiner(16, depth=2, num_heads=2)
  params = unboxed_init(deep, feats, valid, pool, t_emb)
  out, _ = deep.apply({"params": params}, feats, valid, pool, t_emb)
  shallow = refiner.TokenRefiner(16, depth=0, num_heads=2)
  p0 = {k: v for k, v in params.items() if not k.startswith("block_")}
  ref, _ = shallow.apply({"params": p0}, feats, valid, pool, t_emb)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # ... and the same blocks with open gates are not the identity (the test can fail).
  moved, _ = deep.apply({"params": perturb(params)}, feats, valid, pool, t_emb)
  assert float(jnp.abs(moved - ref).max()) > 1e-3
  # Without gating (the paper's ablation) the blocks act from the start.
  ungated = refiner.TokenRefiner(16, depth=2, num_heads=2, gated=False)
  pu = unboxed_init(ungated, feats, valid, pool, t_emb)
  out_u, _ = ungated.apply({"params": pu}, feats, valid, pool, t_emb)
  ref_u, _ = shallow.apply({"params": {k: v for k, v in pu.items() if not k.startswith("block_")}},
                           feats, valid, pool, t_emb)
  assert float(jnp.abs(out_u - ref_u).max()) > 1e-3


def test_feature_norm_makes_the_refiner_blind_to_the_towers_scale():
  feats, valid, pool, t_emb = refiner_inputs()
  normed = refiner.TokenRefiner(16, depth=2, num_heads=2, feature_norm=True)
  params = perturb(unboxed_init(normed, feats, valid, pool, t_emb))
  out = normed.apply({"params": params}, feats, valid, pool, t_emb)
  scaled = normed.apply({"params": params}, 7.0 * feats, valid, pool, t_emb)  # a pretrained tower's larger states
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), out, scaled)
  raw = refiner.TokenRefiner(16, depth=2, num_heads=2)  # the same weights: feature_norm adds none
  a, b = (raw.apply({"params": params}, f, valid, pool, t_emb)[1] for f in (feats, 7.0 * feats))
  assert float(jnp.abs(a - b).max()) > 1e-2


def test_collaborative_refiner_reads_the_other_tower():
  k = jax.random.split(jax.random.key(4), 4)
  xs = [jax.random.normal(k[0], (2, 5, 16)), jax.random.normal(k[1], (2, 7, 16))]
  vs = [jnp.ones((2, 5), bool), jnp.ones((2, 7), bool)]
  cs = [jax.random.normal(k[2], (2, 16))] * 2
  r = refiner.CollaborativeRefiner(num_heads=2)
  p = perturb(unboxed_init(r, xs, vs, cs))
  out = r.apply({"params": p}, xs, vs, cs)
  # change the second tower only (not by a constant: LayerNorm would cancel that)
  xs2 = [xs[0], xs[1].at[:, 0].add(jax.random.normal(k[3], (2, 16)))]
  out2 = r.apply({"params": p}, xs2, vs, cs)
  assert float(jnp.abs(out[0] - out2[0]).max()) > 1e-3  # branch 0 attends to tower 1
  # padded keys of the other tower are ignored
  vs_p = [vs[0], vs[1].at[:, -2:].set(False)]
  a = r.apply({"params": p}, xs, vs_p, cs)
  b = r.apply({"params": p}, [xs[0], xs[1].at[:, -2:].set(9.0)], vs_p, cs)
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)


# ---------------------------------------------------------------------------- the denoiser

@pytest.fixture(scope="module", params=["refiners", "tokens"])
def denoiser(request):
  """(module, params, inputs, overrides) of the tiny config's denoiser with each conditioner."""
  over = {"conditioner.kind": request.param}
  config = tiny_config(**over)
  m = model_lib.build_model(config)
  inputs = model_lib.abstract_inputs(config, 2)
  rng = np.random.default_rng(0)
  real = {}
  for k, v in inputs.items():
    if isinstance(v, list):
      real[k] = [jnp.asarray(rng.normal(size=s.shape), s.dtype) if s.dtype != jnp.bool_ else jnp.ones(s.shape, bool)
                 for s in v]
    elif v.dtype == jnp.bool_:
      real[k] = jnp.zeros(v.shape, bool)
    else:
      real[k] = jnp.asarray(rng.uniform(size=v.shape), v.dtype)
  # Mark a few instruction tokens and some padding.
  real["prompts"] = [p.at[:, :5].set(False) for p in real["prompts"]]
  real["valids"] = [v.at[1, -10:].set(False) for v in real["valids"]]
  real["prompts"] = [p & v for p, v in zip(real["prompts"], real["valids"])]
  params = perturb(unboxed_init(m, **real))
  return m, params, real, over


def test_denoiser_ignores_padding(denoiser):
  m, p, x, over = denoiser
  out = m.apply({"params": p}, **x)
  junk = dict(x, feats=[f.at[1, -10:].set(5.0) for f in x["feats"]])
  np.testing.assert_allclose(m.apply({"params": p}, **junk), out, atol=1e-5)
  real_change = dict(x, feats=[f.at[1, 6].add(1.0) for f in x["feats"]])
  assert float(jnp.abs(m.apply({"params": p}, **real_change) - out).max()) > 1e-4


def test_denoiser_no_nan_with_empty_text(denoiser):
  m, p, x, over = denoiser
  empty = dict(x, valids=[jnp.zeros_like(v) for v in x["valids"]], prompts=[jnp.zeros_like(v) for v in x["prompts"]])
  assert bool(jnp.all(jnp.isfinite(m.apply({"params": p}, **empty))))


def test_null_context_replaces_text(denoiser):
  m, p, x, over = denoiser
  drop = dict(x, drop_B=jnp.ones((2,), bool))
  other = dict(drop, feats=[f + 1.0 for f in x["feats"]])
  np.testing.assert_allclose(m.apply({"params": p}, **drop), m.apply({"params": p}, **other), atol=1e-5)
  assert float(jnp.abs(m.apply({"params": p}, **drop) - m.apply({"params": p}, **x)).max()) > 1e-4


def test_cfg_scale_one_is_the_conditional_prediction(denoiser):
  m, p, x, over = denoiser
  cond = lambda xt, t: m.apply({"params": p}, xt, t, x["feats"], x["valids"], x["prompts"], jnp.zeros((2,), bool))
  uncond = lambda xt, t: m.apply({"params": p}, xt, t, x["feats"], x["valids"], x["prompts"], jnp.ones((2,), bool))
  both = lambda xt, t: (cond(xt, t), uncond(xt, t))
  xt, t = x["x_BHWC"], x["t_B"]
  np.testing.assert_allclose(guidance.guided(both, 1.0)(xt, t), cond(xt, t), atol=1e-6)
  assert float(jnp.abs(guidance.guided(both, 3.0)(xt, t) - cond(xt, t)).max()) > 1e-4


def test_config_feature_norm_reaches_the_refiners(denoiser):
  m, p, x, over = denoiser
  normed = model_lib.build_model(tiny_config(**over, **{"model.refiner.feature_norm": True}))
  loud = dict(x, feats=[7.0 * f for f in x["feats"]])
  assert float(jnp.abs(m.apply({"params": p}, **loud) - m.apply({"params": p}, **x)).max()) > 1e-3
  if over["conditioner.kind"] == "refiners":
    np.testing.assert_allclose(normed.apply({"params": p}, **loud), normed.apply({"params": p}, **x), atol=1e-4)
  else:  # the refiners' option: plain tokens ignore it
    np.testing.assert_allclose(normed.apply({"params": p}, **loud), m.apply({"params": p}, **loud), atol=1e-6)


def test_instruction_tokens_are_dropped_from_the_context(denoiser):
  m, p, x, over = denoiser
  # Instruction tokens reach the DiT only through the refiners; with drop_instruction they are masked
  # out of the cross-attention, so without refiner blocks (depth 0, concat; or plain tokens) they cannot matter.
  over = {**over, "model.refiner.depth": 0, "model.refiner.fusion": "concat"}
  config = tiny_config(**over)
  m0 = model_lib.build_model(config)
  p0 = perturb(unboxed_init(m0, **x))
  out = m0.apply({"params": p0}, **x)
  changed = dict(x, feats=[f.at[:, :5].add(3.0) for f in x["feats"]])
  np.testing.assert_allclose(m0.apply({"params": p0}, **changed), out, atol=1e-5)
  keep = model_lib.build_model(tiny_config(**{**over, "text.drop_instruction": False}))
  assert float(jnp.abs(keep.apply({"params": p0}, **changed) - keep.apply({"params": p0}, **x)).max()) > 1e-4


# ---------------------------------------------------------------------------- structure and options

def test_every_parameter_has_logical_axis_names():
  import flax.linen as nn
  config = tiny_config()
  m = model_lib.build_model(config)
  boxed = jax.eval_shape(lambda kw: m.init(jax.random.key(0), **kw), model_lib.abstract_inputs(config, 1))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
  # the scanned depth axis is named too
  blocks = boxed["denoiser"]["blocks"]["block"]["mlp"]["fc1"]["kernel"]
  assert blocks.names[0] == "layers" and blocks.value.shape[0] == config.model.depth


def test_remat_and_bf16_options(denoiser):
  m, p, x, over = denoiser
  out = m.apply({"params": p}, **x)
  remat = model_lib.build_model(tiny_config(**{**over, "model.remat": "full"}))
  np.testing.assert_allclose(remat.apply({"params": p}, **x), out, atol=1e-5)
  grads = [jax.grad(lambda q: jnp.sum(mod.apply({"params": q}, **x) ** 2))(p) for mod in (m, remat)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(a).max()) + 1e-6)
  bf16 = model_lib.build_model(tiny_config(**{**over, "model.dtype": "bfloat16"}))
  out16 = bf16.apply({"params": p}, **x)
  assert out16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out16)))
  assert float(jnp.abs(out16 - out).max()) < 0.1 * float(jnp.abs(out).max()) + 1e-2


def test_unrolled_depth_matches_scanned(denoiser):
  m, p, x, over = denoiser
  unrolled = model_lib.build_model(tiny_config(**{**over, "model.scan": False}))
  stacked = p["denoiser"]["blocks"]["block"]
  den = {k: v for k, v in p["denoiser"].items() if k != "blocks"}
  for i in range(2):
    den[f"blocks_{i}"] = {"block": jax.tree.map(lambda a: a[i], stacked)}
  p2 = dict(p, denoiser=den)
  np.testing.assert_allclose(unrolled.apply({"params": p2}, **x), m.apply({"params": p}, **x), atol=1e-5)


def test_weight_decay_reaches_kernels_only():
  import flax.linen as nn
  from lidit_jax import state as state_lib
  config = tiny_config()
  m = model_lib.build_model(config)
  boxed = jax.eval_shape(lambda kw: m.init(jax.random.key(0), **kw), model_lib.abstract_inputs(config, 1))["params"]
  mask = state_lib.decay_mask(boxed)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(nn.unbox(mask))[0]}
  assert flat["denoiser/blocks/block/mlp/fc1/kernel"] is True
  assert flat["denoiser/blocks/block/mlp/fc1/bias"] is False  # 2-D under scan, still no decay
  assert flat["denoiser/blocks/block/self_attn/q_norm/scale"] is False


def test_splash_attention_kernel_matches_xla_in_the_dit():
  """The TPU path (Pallas splash attention, here in interpret mode) against XLA attention: the DiT's
  self-attention and masked cross-attention, forward and gradients, inside a mesh (the shard_map path)."""
  import dataclasses
  from lidit_jax import sharding
  cfg = dit_lib.DiTConfig(width=32, depth=2, num_heads=2, patch_size=2, in_channels=3)  # 256 image tokens
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  t_emb, pooled = jnp.ones((2, 32)) * 0.1, jnp.ones((2, 32)) * 0.2
  ctx = jnp.asarray(rng.standard_normal((2, 128, 32)), jnp.float32)  # the kernel's blocks are 128 tokens
  valid = jnp.asarray(np.arange(128)[None, :] < np.array([[128], [40]]))
  xla = dit_lib.DiT(cfg)
  params = unboxed_init(xla, x, t_emb, pooled, ctx, valid)
  params = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  splash = dit_lib.DiT(dataclasses.replace(cfg, attention="splash_interpret"))
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x, t_emb, pooled, ctx, valid) ** 2)
  c = configs.base_config()
  with sharding.active(sharding.make_mesh(c.mesh), sharding.rules(c.sharding_rules)):
    want, g_want = jax.value_and_grad(loss(xla))(params)
    got, g_got = jax.value_and_grad(loss(splash))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3), g_got, g_want)


def test_adaln_single_has_pixart_structure():
  """modulation="single" lays out parameters as diffusers' PixArtTransformer2DModel: the same count per block
  and in total, apart from the documented differences (PixArt's caption projection, our pooled-text layer)."""
  from diffusers import PixArtTransformer2DModel
  d, heads, depth, latent = 32, 4, 3, 8
  ours_cfg = dit_lib.pixart_alpha(d, heads, depth)
  ref = PixArtTransformer2DModel(**dit_lib.pixart_diffusers_kwargs(ours_cfg, latent))
  x = jnp.zeros((2, latent, latent, 4))
  ctx, valid = jnp.ones((2, 5, d)), jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  t_emb = jnp.ones((2, d))
  count = lambda tree: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))
  ref_count = lambda prefix: sum(p.numel() for n, p in ref.named_parameters() if n.startswith(prefix))
  embedder = count(unboxed_init(layers.TimestepEmbedder(d), jnp.array([0.1, 0.9])))
  params = unboxed_init(dit_lib.DiT(ours_cfg), x, t_emb, t_emb, ctx, valid)
  assert count(params["blocks"]) == depth * ref_count("transformer_blocks.0.")
  ours_total = embedder + count(params) - count(params["text_pool_proj"])
  assert ours_total == ref_count("") - ref_count("caption_projection")
  # The block-modulated (LI-DiT) layout differs, so the comparison above can fail.
  block_cfg = dit_lib.DiTConfig(**{**ours_cfg.__dict__, "modulation": "block"})
  assert count(unboxed_init(dit_lib.DiT(block_cfg), x, t_emb, t_emb, ctx, valid)) != count(params)
  # Trainable and finite; the padded text tokens are ignored.
  p, model = perturb(params), dit_lib.DiT(ours_cfg)
  t_emb = jnp.array([[0.3], [0.7]]) * jnp.ones((2, d))
  out = model.apply({"params": p}, x + 0.5, t_emb, t_emb, ctx, valid)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  ctx2 = ctx.at[0, 3:].set(7.0)  # change only padded tokens of example 0
  np.testing.assert_allclose(model.apply({"params": p}, x + 0.5, t_emb, t_emb, ctx2, valid)[0], out[0], atol=1e-5)
  assert not np.allclose(model.apply({"params": p}, x + 0.5, t_emb, t_emb, ctx.at[0, 0].set(7.0), valid)[0], out[0],
                         atol=1e-3)


def test_plain_tokens_conditioner_is_one_projection_per_tower():
  """conditioner.kind=tokens: the report's conditioner group is each tower's width -> model width projection,
  and the planner counts its FLOPs (2 x weights x tokens), without a family naming it."""
  from lidit_jax import plan
  config = tiny_config(**{"conditioner.kind": "tokens"})
  dims = [t.hidden_size for t in (config.text.towers[n] for n in model_lib.tower_names(config))]
  w = config.model.width
  assert model_lib.param_report(config)["conditioner"] == sum(d * w + w for d in dims)
  flops = plan.model_flops_per_example(config, model_lib.planned_towers(config))
  lens = [config.text.towers[n].max_length for n in model_lib.tower_names(config)]
  assert flops["conditioner"] == sum(2 * l * d * w for l, d in zip(lens, dims))


def test_splash_attention_falls_back_to_xla_where_a_length_does_not_tile():
  """A U-Net's deepest level holds 8 x 8 = 64 tokens, which splash's 128-token blocks cannot tile: the TPU
  compile of configs/diff_adapter.py failed there ("bkv_compute=64 must be a multiple of 128"). Such a call
  takes XLA's kernel; one that tiles keeps splash."""
  from lidit_jax.models import layers
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 64, 2, 16)) for i in range(3))
  want = layers.attend(q, k, v)
  np.testing.assert_allclose(layers.attend(q, k, v, implementation="splash_interpret"), want, rtol=1e-6, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(lambda a, b, c: layers.attend(a, b, c, implementation="splash_interpret"))(q, k, v))
  assert "pallas_call" not in jaxpr
  q2, k2, v2 = (jax.random.normal(jax.random.key(i), (1, 128, 2, 16)) for i in range(3))
  tiled = str(jax.make_jaxpr(lambda a, b, c: layers.attend(a, b, c, implementation="splash_interpret"))(q2, k2, v2))
  assert "pallas_call" in tiled


def test_splash_attention_takes_grouped_query_heads_and_a_scale():
  """Lumina 2's 24 query / 8 kv heads with its own logit scale: the TPU compile of configs/lumina2.py failed on
  splash's equal-heads assertion. The kernel now reads kv head i // 3 for query head i, as XLA's does."""
  from lidit_jax.models import layers
  q = jax.random.normal(jax.random.key(0), (1, 128, 6, 16))
  k, v = (jax.random.normal(jax.random.key(i), (1, 128, 2, 16)) for i in (1, 2))
  mask = (jnp.arange(128) < 100)[None, None, None, :]
  want = layers.attend(q, k, v, mask, scale=0.1)
  got = layers.attend(q, k, v, mask, scale=0.1, implementation="splash_interpret")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want - layers.attend(q, k, v, mask))).max() > 1e-2  # the scale matters here
