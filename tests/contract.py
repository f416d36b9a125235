"""The plugin contract's configurations: every denoiser family x conditioner x objective x autoencoder, built from
the demo's tiny config (tests/test_contract*.py). A new plugin joins by adding its value below."""
import itertools

import pytest

from lidit_jax import configs
from lidit_jax.convert import tiny_models

from conftest import ROOT

FAMILIES = {"lidit": [], "unet": ["unet"], "pixart": ["pixart"], "sana": ["sana"], "lumina2": ["lumina2"]}  # configs/shapes.py variants that make each plugin's section
CONDITIONERS = {"refiners": [], "tokens": [], "identity": [], "llm4gen": ["cam"], "diff_adapter": ["diff"]}
OBJECTIVES = ("rectified_flow", "ddpm")
AUTOENCODERS = {"identity": [], "patches": ["patches"], "vae": []}
EVERY = list(itertools.product(FAMILIES, CONDITIONERS, OBJECTIVES, AUTOENCODERS))

# The run contract on some of them: each conditioner, each (family, objective), (family, autoencoder) and
# (objective, autoencoder) pair (the whole product would take over an hour here).
RUNS = [("lidit", "refiners", "rectified_flow", "identity"), ("lidit", "llm4gen", "ddpm", "patches"),
        ("lidit", "identity", "ddpm", "vae"), ("unet", "tokens", "rectified_flow", "vae"),
        ("unet", "diff_adapter", "ddpm", "identity"), ("unet", "refiners", "rectified_flow", "patches"),
        ("pixart", "refiners", "ddpm", "vae")]
# Sana and Lumina 2 run the same contract in their own tests: refiners on them in tests/test_lidit_backbones.py,
# fine-tune / preempt / resume / export in tests/test_sana.py and tests/test_lumina2.py.
# On eight devices: the U-Net (the SD family's sharding) with the Diff Adapter (training noise drawn per example),
# the DiT with the CAM (a conditioner holding most of the parameters); LI-DiT's refiners: tests/test_scale.py.
MESH_RUNS = [("unet", "diff_adapter", "ddpm", "identity"), ("lidit", "llm4gen", "rectified_flow", "patches")]


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  """A tiny random diffusers VAE folder (2x down, 4 latent channels)."""
  return tiny_models.write_tiny_vae(str(tmp_path_factory.mktemp("contract") / "vae"), seed=3)


def combo_id(combo) -> str:
  return "-".join(combo)


def config_arg(family, conditioner, objective, autoencoder, vae: str = "") -> tuple[str, dict]:
  """(`--config` argument, overrides) of a combination: configs/shapes.py:tiny with the four plugins chosen. The
  identity conditioner reads one tower (its features are the context: one tower's width is the denoiser's context
  width); both objectives sample with Euler."""
  variants = ["tiny", *FAMILIES[family], *CONDITIONERS[conditioner], *AUTOENCODERS[autoencoder]]
  arg = f"{ROOT / 'configs' / 'shapes.py'}:{','.join(variants)}"
  settings = {"conditioner.kind": conditioner, "objective.kind": objective, "sample.sampler": "euler"}
  if conditioner == "identity":
    settings["text.use"] = configs.tower_names(configs.load_config_file(arg))[0]
  if autoencoder == "vae":
    settings.update({"autoencoder.kind": "vae", "autoencoder.path": vae, "autoencoder.factor": 2,
                     "autoencoder.channels": 4})
  return arg, settings


def config_for(family, conditioner, objective, autoencoder, vae: str = "", **overrides):
  arg, settings = config_arg(family, conditioner, objective, autoencoder, vae)
  return configs.validate(configs.apply_overrides(configs.load_config_file(arg), {**settings, **overrides}))
