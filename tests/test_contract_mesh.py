"""The contract on a mesh: a combination trained on 8 simulated devices (4 data x 2 fsdp: parameters and optimizer
state sharded) logs the losses of the same run on one device, the training noise drawn the same however the batch
is split (tests/contract.py: MESH_RUNS)."""
import numpy as np
import pytest

from conftest import one_and_eight_device_losses
from contract import MESH_RUNS, combo_id, config_arg, vae  # noqa: F401  (vae: a fixture)

FLAGS = ["--config.train.batch_size=8", "--config.train.num_steps=3", "--config.train.log_every=1",
         "--config.train.sample_every=100"]


@pytest.mark.slow
@pytest.mark.parametrize("combo", MESH_RUNS, ids=combo_id)
def test_eight_devices_log_the_one_device_losses(combo, vae, tmp_path):
  arg, settings = config_arg(*combo, vae=vae)
  flags = FLAGS + [f"--config.{k}={v}" for k, v in settings.items()]
  losses = one_and_eight_device_losses(arg, flags, ["--config.mesh.data=4", "--config.mesh.fsdp=2"], tmp_path)
  assert len(losses["one"]) == 3 and losses["one"][0] != losses["one"][-1]
  np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-4)
