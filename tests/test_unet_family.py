"""The SD family on the seam: `configs/shapes.py:tiny,unet` (a U-Net on plain tokens, v-prediction DDPM) trains,
plans, rematerialises and starts from converted weights; its runs are the contract's (tests/test_contract_runs.py)."""
import numpy as np
import pytest

from lidit_jax import configs, model, plan, state, train

from conftest import ROOT

TINY_UNET = str(ROOT / "configs" / "shapes.py") + ":tiny,unet"


def unet_config(**overrides):
  return configs.validate(configs.apply_overrides(configs.load_config_file(TINY_UNET), overrides))


def test_unet_family_reports_and_plans_its_parameters():
  """The U-Net on LI-DiT's refiners (the conditioners are backbone-agnostic): the parameter report and the planner
  count it (its runs: tests/test_contract_runs.py)."""
  config = unet_config(**{"conditioner.kind": "refiners"})
  report = model.param_report(config)
  assert report["denoiser (U-Net)"] > 0 and report["conditioner"] > 0 and report["trainable total"] == sum(
      v for k, v in report.items() if not k.startswith(("frozen", "trainable")))
  p = plan.plan(config, 1)
  assert p["model_tflop_per_step"] > 0 and p["bytes_per_device"]["activations_estimate"] > 0


def test_unet_config_refusals():
  with pytest.raises(configs.ConfigError, match="unet.num_heads"):
    unet_config(**{"unet.num_heads": 3})
  with pytest.raises(configs.ConfigError, match="unet.block_out_channels"):
    unet_config(**{"unet.block_out_channels": (16, 32, 64)})  # block types still list two blocks
  with pytest.raises(configs.ConfigError, match="data.image_size"):
    unet_config(**{"data.image_size": 33})


@pytest.mark.parametrize("policy", ["dots"])  # every policy goes through the same wrap
def test_unet_remat_keeps_outputs_and_gradients_and_shrinks_the_estimate(policy):
  import jax
  import jax.numpy as jnp
  base = unet_config()
  m0, m1 = model.build_model(base), model.build_model(unet_config(**{"model.remat": policy}))
  inputs = model.abstract_inputs(base, 2)
  rng = np.random.default_rng(0)
  x = jax.tree.map(lambda s: jnp.ones(s.shape, bool) if s.dtype == jnp.bool_ else
                   jnp.asarray(rng.normal(size=s.shape), s.dtype), inputs)
  x["drop_B"] = jnp.zeros((2,), bool)
  params = jax.tree.map(lambda a: a + 0.05 * jnp.asarray(rng.normal(size=a.shape), a.dtype),  # off the zero inits
                        nn_unbox(m0.init(jax.random.key(0), **x)["params"]))
  loss = lambda mod: lambda p: jnp.sum(mod.apply({"params": p}, **x) ** 2)
  np.testing.assert_allclose(m1.apply({"params": params}, **x), m0.apply({"params": params}, **x), atol=1e-5)
  g0, g1 = jax.grad(loss(m0))(params), jax.grad(loss(m1))(params)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, atol=1e-5 * float(jnp.abs(a).max()) + 1e-7)
  # Checkpointed: the remat wraps are in the jaxpr, and the planner counts fewer kept activations
  assert "remat" in str(jax.make_jaxpr(jax.grad(loss(m1)))(params))
  act = lambda c: plan.plan(c, 1)["bytes_per_device"]["activations_estimate"]
  assert act(unet_config(**{"model.remat": policy})) < act(base)


def nn_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def test_model_init_reads_a_converted_diffusers_unet(tmp_path):
  """`model.init` at a converted diffusers U-Net: the denoiser starts from its weights (the conditioner and the
  null context from their initialisation) and trains; a config whose U-Net differs is refused by field."""
  import jax
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from lidit_jax.convert import diffusers_unet
  from lidit_jax.cli import UserError
  from lidit_jax.convert.__main__ import stream
  base = unet_config()
  u = base.unet
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=3, out_channels=3, block_out_channels=tuple(u.block_out_channels),
      down_block_types=tuple(u.down_block_types), up_block_types=tuple(u.up_block_types),
      layers_per_block=u.layers_per_block, attention_head_dim=u.num_heads, cross_attention_dim=u.cross_attention_dim,
      norm_num_groups=u.norm_num_groups, use_linear_projection=u.use_linear_projection)
  ref.save_pretrained(tmp_path / "unet")
  conv = diffusers_unet.Conversion.prepare(str(tmp_path / "unet"))
  stream(conv, diffusers_unet, str(tmp_path / "unet"), str(tmp_path / "converted"), np.float32)
  config = unet_config(**{"model.init": str(tmp_path / "converted"), "train.num_steps": 2})
  s = state.setup(config)
  st = s.init_state(jax.random.key(0))
  _, want = diffusers_unet.load_unet(str(tmp_path / "converted"))
  for a, b in zip(jax.tree.leaves(st.params["denoiser"]), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(st.ema_params["denoiser"])[0]),
                                np.asarray(jax.tree.leaves(want)[0]))
  train.train_and_evaluate(config, str(tmp_path / "run"))  # and it trains from there
  with pytest.raises(UserError, match="num_heads"):
    state.setup(unet_config(**{"model.init": str(tmp_path / "converted"), "unet.num_heads": 1})).init_state(
        jax.random.key(0))
