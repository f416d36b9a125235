"""The SD family on the seam: `configs/shapes.py:tiny,unet` (a U-Net on plain tokens, v-prediction DDPM) trains,
resumes, samples and plans through the same trainer, sampler and planner as LI-DiT."""
import json
import os

import numpy as np
import pytest

from lidit_jax import configs, model, plan, sample, state, train
from lidit_jax.pipeline import Pipeline, Workdir

from conftest import ROOT

TINY_UNET = str(ROOT / "configs" / "shapes.py") + ":tiny,unet"


def unet_config(**overrides):
  return configs.validate(configs.apply_overrides(configs.load_config_file(TINY_UNET), overrides))


def test_unet_family_trains_samples_and_plans(tmp_path):
  config = unet_config()
  train.train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) >= 2 and np.isfinite(losses).all()
  s, params, step = state.restore_for_inference(config, str(tmp_path))
  assert step == config.train.num_steps and "down_blocks_0" in params["denoiser"]
  imgs = sample.generate_images(Pipeline(Workdir.of(s, params)), ["a red circle"], 1, steps=3, cfg_scale=2.0,
                                sampler="ddim")
  assert imgs.shape == (1, 1, 32, 32, 3) and imgs.std() > 0
  report = model.param_report(config)
  assert report["denoiser (U-Net)"] > 0 and report["trainable total"] == sum(
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
