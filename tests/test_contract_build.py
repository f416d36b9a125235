"""Every denoiser family x conditioner x objective x autoencoder builds and lowers its train step (abstract: nothing
allocated). The runs themselves: tests/test_contract_runs.py."""
import pytest

from lidit_jax import train

from contract import EVERY, combo_id, config_for, vae  # noqa: F401  (vae: a fixture)


@pytest.mark.parametrize("combo", EVERY, ids=combo_id)
def test_every_combination_lowers_its_train_step(combo, vae):
  config = config_for(*combo, vae=vae)
  lowered = train.lower_train_step(config)
  state, metrics = lowered.out_info
  assert {"loss", "grad_norm"} <= set(metrics) and metrics["loss"].shape == ()
  assert "denoiser" in state.params  # a conditioner may have no parameters (identity)
