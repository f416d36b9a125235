"""Sana's DC-AE (`autoencoder.kind=dc_ae`, models/dc_ae.py) against diffusers' AutoencoderDC: tiny random folders
the test builds and saves (ResBlocks and EfficientViT blocks with multi-scale q / k / v, both down / up block
kinds), float32: encode and decode within 1e-4, the linear attention and its quadratic form at the smallest grids;
our export loads back into diffusers bit for bit; a run trains and samples in its latent space."""
import numpy as np
import pytest

from lidit_jax.convert import diffusers_dc_ae

from conftest import tiny_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def dc_ae(path, up="interpolate", down="Conv", seed=0):
  """Three levels (4x down, 4 channels), head dim 4: a 32 px image's deepest grid (8 x 8) takes the linear
  attention, an 8 px image's (2 x 2) the quadratic one."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderDC(
      in_channels=3, latent_channels=4, attention_head_dim=4,
      encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
      decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
      encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
      encoder_layers_per_block=(1, 1, 2), decoder_layers_per_block=(1, 2, 1),
      encoder_qkv_multiscales=((), (5,), (3, 5)), decoder_qkv_multiscales=((), (5,), (5,)),
      upsample_block_type=up, downsample_block_type=down, decoder_act_fns=("silu", "relu", "silu"),
      scaling_factor=0.4).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  model.save_pretrained(path)
  return model


@pytest.mark.parametrize("up,down", [("interpolate", "Conv"), ("pixel_shuffle", "pixel_unshuffle")])
def test_encode_decode_equal_diffusers(tmp_path, up, down):
  import jax.numpy as jnp
  ref = dc_ae(tmp_path / "vae", up, down)
  module, params = diffusers_dc_ae.load(str(tmp_path / "vae"))
  for side in (32, 8):  # linear attention at the deepest grid, then quadratic
    x = np.random.default_rng(side).uniform(-1, 1, (2, side, side, 3)).astype(np.float32)
    with torch.no_grad():
      z = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent
      y = ref.decode(z).sample.numpy().transpose(0, 2, 3, 1)
    z = z.numpy().transpose(0, 2, 3, 1)
    assert np.abs(z).max() > 1.0 and np.abs(y).max() > 0.3  # the tiny models' outputs have scale
    np.testing.assert_allclose(module.apply({"params": params}, jnp.asarray(x), method="encode"), z, atol=1e-4)
    np.testing.assert_allclose(module.apply({"params": params}, jnp.asarray(z), method="decode"), y, atol=1e-4)


def test_export_is_bit_exact_and_diffusers_loads_it(tmp_path):
  from safetensors.numpy import load_file, save_file
  import json
  dc_ae(tmp_path / "vae", seed=1)
  module, params = diffusers_dc_ae.load(str(tmp_path / "vae"))
  config, state = diffusers_dc_ae.to_diffusers(module.cfg, params)
  src = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
  assert set(state) == set(src)
  for k, v in state.items():
    np.testing.assert_array_equal(v, src[k], err_msg=k)
  (tmp_path / "back").mkdir()
  save_file(state, str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "back" / "config.json").write_text(json.dumps(config))
  back = diffusers.AutoencoderDC.from_pretrained(str(tmp_path / "back"))
  assert back.config.scaling_factor == 0.4 and back.config.upsample_block_type == "interpolate"


def test_refuses_what_it_does_not_implement():
  with pytest.raises(ValueError, match="decoder_norm_types"):
    diffusers_dc_ae.config_from_diffusers({"_class_name": "AutoencoderDC", "decoder_norm_types": "batch_norm"})
  with pytest.raises(ValueError, match="is not an AutoencoderDC"):
    diffusers_dc_ae.config_from_diffusers({"_class_name": "AutoencoderKL"})


def test_a_run_trains_and_samples_in_its_latent_space(tmp_path):
  """The shapes demo's tiny LI-DiT on the DC-AE's latents (32 px -> 8 x 8 x 4): trains, and samples images the
  decoder draws."""
  from lidit_jax import autoencoder, train
  from lidit_jax.pipeline import Pipeline
  dc_ae(tmp_path / "vae")
  config = tiny_config(**{"autoencoder.kind": "dc_ae", "autoencoder.path": str(tmp_path / "vae"),
                          "autoencoder.factor": 4, "autoencoder.channels": 4, "model.patch_size": 2,
                          "train.num_steps": 2, "train.checkpoint_every": 2, "train.sample_every": 100})
  ae, params = autoencoder.build(config.autoencoder)
  images = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  latents = ae.encode(params, images)
  assert latents.shape == (1, 8, 8, 4)
  np.testing.assert_allclose(ae.decode(params, latents), ae.module.apply({"params": params}, images), atol=1e-5)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  out = Pipeline.from_pretrained(str(tmp_path / "run"))(["a red circle"], num_steps=2, seed=0)
  assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all() and out.std() > 0
