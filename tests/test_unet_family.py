"""The SD family on the seam: `configs/shapes.py:tiny,unet` (a U-Net on plain tokens, v-prediction DDPM) trains,
resumes, samples and plans through the same trainer, sampler and planner as LI-DiT."""
import json
import os

import numpy as np
import pytest

from lidit_jax import configs, model, plan, sample, state, train

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
  imgs = sample.generate_images(s, params, ["a red circle"], 1, steps=3, cfg_scale=2.0, sampler="ddim")
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
