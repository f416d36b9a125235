"""Config validation (before any compute) and the paper-sized configs built abstractly."""
import json
import subprocess
import sys

import pytest

from lidit_jax import configs, model as model_lib

from conftest import ROOT, tiny_config


@pytest.mark.parametrize("overrides,message", [
    ({"model.width": 100, "model.num_heads": 16}, "model.width=100: not divisible by model.num_heads=16"),
    ({"data.image_size": 30}, "data.image_size=30: not divisible by the denoiser's unit x autoencoder factor"),
    ({"model.refiner.fusion": "collaborative", "text.use": "llama_a"}, "needs two or more LLM towers"),
    ({"text.use": "llama_a,gpt"}, "tower 'gpt' is not defined"),
    ({"text.towers.llama_a.layer": -9}, "text.towers.llama_a.layer=-9"),
    ({"model.pos_embed": "rope"}, "model.pos_embed='rope': must be one of"),
    ({"optim.lr": -1.0}, "optim.lr=-1.0"),
    ({"sample.sampler": "ddim"}, "sample.sampler='ddim'"),
    ({"autoencoder.factor": 8}, "pixel space (identity) means factor 1"),
])
def test_bad_values_are_refused_with_the_fix(overrides, message):
  with pytest.raises(ValueError) as e:
    tiny_config(**overrides)
  assert message in str(e.value)
  assert "Fix:" in str(e.value)


def test_unknown_key_is_refused_on_the_command_line():
  r = subprocess.run([sys.executable, "-m", "lidit_jax.train", "--config", str(ROOT / "configs/shapes.py:tiny"),
                      "--workdir", "/tmp/unused", "--config.optim.learning_rate=3e-4"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  assert "learning_rate" in r.stderr


def test_overrides_from_python_refuse_unknown_keys_and_wrong_types():
  """configs.apply_overrides (benchmarks, the ablation, tests): a misspelt key is not silently added."""
  with pytest.raises(configs.ConfigError, match="no key 'model.widthh'"):
    tiny_config(**{"model.widthh": 64})
  with pytest.raises(configs.ConfigError, match="no key 'nosuch.depth'"):
    tiny_config(**{"nosuch.depth": 1})
  with pytest.raises(configs.ConfigError, match="model.width='wide'.*Fix: give a value of the key's type"):
    tiny_config(**{"model.width": "wide"})
  assert tiny_config(**{"model.refiner.depth": 0}).model.refiner.depth == 0


def test_paper_configs_build_abstractly_with_the_right_sizes():
  """LI-DiT-1B and -10B: parameters from eval_shape only (nothing allocated)."""
  for name, low, high in (("lidit_1b.py", 1.0e9, 1.2e9), ("lidit_10b.py", 9.5e9, 11.0e9)):
    c = configs.validate(configs.load_config_file(str(ROOT / "configs" / name)))
    report = model_lib.param_report(c)
    assert low < report["trainable total"] < high, (name, report)
    assert report["frozen text model llama3"] > 7e9  # the towers are counted apart, not trained


def test_variants_are_checked():
  with pytest.raises(ValueError, match="unknown variant"):
    configs.load_config_file(str(ROOT / "configs/shapes.py:huge"))


def test_attention_implementation_is_guarded_by_platform():
  from lidit_jax import model as model_lib
  c = configs.load_config_file(str(ROOT / "configs" / "shapes.py") + ":tiny")
  assert model_lib.attention_implementation(c) == "xla"  # this CPU
  c.model.dtype = "bfloat16"
  assert model_lib.attention_implementation(c, platform="gpu") == "cudnn"
  assert model_lib.attention_implementation(c, platform="tpu") == "xla"  # 64 image tokens: no 128 blocks
  c.model.patch_size, c.text.towers.llama_a.max_length, c.text.towers.llama_b.max_length = 2, 64, 64
  assert model_lib.attention_implementation(c, platform="tpu") == "splash"  # 256 image, 128 text tokens
  c.model.attention = "splash"
  with pytest.raises(ValueError, match="needs a TPU"):
    model_lib.attention_implementation(c)
  c.model.patch_size = 4  # 64 image tokens: asked for, splash runs the calls it tiles, XLA's kernel the others
  assert model_lib.attention_implementation(c, platform="tpu") == "splash"
  c.model.attention = "cudnn"
  with pytest.raises(ValueError, match="needs a GPU"):
    model_lib.attention_implementation(c)
  c.model.attention = "flash"
  with pytest.raises(ValueError, match="model.attention"):
    configs.validate(c)


def test_multi_slice_mesh_puts_slices_on_the_dcn_axis(monkeypatch):
  """Two slices of 4 devices, mesh data=1 x fsdp=4 per slice, dcn_data=2: the data axis crosses slices,
  fsdp stays within one (devices are stand-ins with a slice_index, as on a multi-slice TPU pod)."""
  import types
  import numpy as np
  from lidit_jax import sharding
  devices = [types.SimpleNamespace(id=i, slice_index=i // 4, process_index=i // 4, platform="cpu",
                                   device_kind="cpu") for i in range(8)]
  monkeypatch.setattr(sharding, "Mesh", lambda arr, axes: (np.vectorize(lambda d: d.slice_index)(arr), axes))
  c = configs.base_config()
  c.mesh.update(data=1, fsdp=4, tensor=1, dcn_data=2)
  slices, axes = sharding.make_mesh(c.mesh, devices)
  assert axes == ("data", "fsdp", "tensor") and slices.shape == (2, 4, 1)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()
  c.mesh.dcn_data = 4
  with pytest.raises(ValueError, match="4 slices"):
    sharding.make_mesh(c.mesh, devices)


def test_plan_for_lidit_10b_on_256_devices_shards_state_evenly():
  """`python -m lidit_jax.plan`: LI-DiT-10B with fsdp=256 puts (params + Adam) / device within 5% of the
  total / 256, from abstract shapes; the CLI prints the same plan as JSON."""
  from lidit_jax import plan
  c = configs.load_config_file(str(ROOT / "configs" / "lidit_10b.py"))
  c.mesh.update(data=1, fsdp=256, tensor=1)
  p = plan.plan(configs.validate(c), 256, chip="v5p")
  b = p["bytes_per_device"]
  even = p["trainable_params"] * 4 * 3 / 256  # float32 params + two Adam moments, split evenly
  assert abs((b["params"] + b["optimizer"]) / even - 1) < 0.05
  assert 10.0e9 < p["trainable_params"] < 11.0e9 and p["step_seconds_at_mfu"] > 0
  r = subprocess.run([sys.executable, "-m", "lidit_jax.plan", "--config", str(ROOT / "configs" / "lidit_1b.py"),
                      "--config.mesh.fsdp=64", "--chip", "v5p"], capture_output=True, text=True, cwd=ROOT,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["devices"] == 64 and out["mesh"]["fsdp"] == 64 and "per device" in r.stdout


def test_plan_counts_and_names_parameters_fsdp_cannot_split():
  """LI-DiT-1B's width 1152 (and its 10368-wide modulation) is not divisible by fsdp=256: fit_spec replicates those
  kernels, the planner counts them (params, grads, Adam, EMA and their update's temporaries, as the TPU compiler did:
  20.7 GiB per chip on v5p-512 against 17.1 on v5p-128) and names the mesh that shards them."""
  from lidit_jax import plan
  c = configs.load_config_file(str(ROOT / "configs" / "lidit_1b.py"))
  wide = plan.plan(configs.validate(c, data=False), 256)
  c.mesh.update(data=2, fsdp=128)
  split = plan.plan(configs.validate(c, data=False), 256)
  assert wide["bytes_per_device"]["params"] > 2 * 2 ** 30 > 20 * split["bytes_per_device"]["params"]
  assert wide["bytes_per_device"]["replicated_update_estimate"] > 2 ** 30
  assert split["bytes_per_device"]["replicated_update_estimate"] < 2 ** 24 and "notes" not in split
  note, = wide["notes"]
  assert "fsdp=256" in note and "(28, 1152, 10368)" in note and "--config.mesh.data=2 --config.mesh.fsdp=128" in note


@pytest.mark.parametrize("name,unet,frozen", [
    ("sd15", 859_520_964, 123.06e6),  # SD 1.5's U-Net (diffusers' count); CLIP ViT-L/14's text side
    ("sdxl", 2_567_463_684, 123.06e6 + 694.66e6),  # SDXL's; CLIP-L + OpenCLIP bigG with projection, counted once
    ("llm4gen_sd15", 859_520_964, 123.06e6 + 1223.5e6)])  # + RankGen's T5-XL encoder
def test_sd_configs_plan_before_any_weights_are_converted(name, unet, frozen):
  """No pipeline folder here: the planner takes the towers' architectures from text.towers.*.plan_arch (before, a
  64-wide placeholder tower made the SD configs unplannable) and the U-Net's from the config's SD defaults."""
  import flax.linen as nn
  import jax
  import numpy as np
  from lidit_jax import model as model_lib, plan
  c = configs.validate(configs.load_config_file(str(ROOT / "configs" / f"{name}.py")), data=False)
  p = plan.plan(c, 8)
  assert p["tower_params"] == pytest.approx(frozen, rel=1e-2)
  denoiser = nn.unbox(model_lib.abstract_params(c))["denoiser"]
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(denoiser)) == unet


def test_a_saved_config_of_the_earlier_layout_reads_with_its_values(tmp_path):
  """tests/data/config_2026-12-05.json: a U-Net run on the refiners saved before the refiners' qk-norm and the
  U-Net's time scale moved into their own sections (model.qk_norm False, a 500-step DDPM): read back, the run's
  model is the one it trained, and the file's layout is today's."""
  saved = json.loads((ROOT / "tests" / "data" / "config_2026-12-05.json").read_text())
  assert "qk_norm" not in saved["model"]["refiner"] and "time_scale" not in saved["unet"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = configs.read_saved(str(tmp_path))
  assert config.model.refiner.qk_norm is False and config.unet.time_scale == 500.0
  assert set(configs.saved_fields(str(tmp_path))) == set(configs.base_config())
  module = model_lib.build_model(config)
  assert module.time_scale == 500.0 and module.conditioner.qk_norm is False
  fresh = configs.base_config()
  assert fresh.unet.time_scale == 1000.0 and fresh.model.refiner.qk_norm is True  # new runs: the defaults
