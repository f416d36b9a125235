"""Sana's transformer (models/sana.py: ReLU linear self-attention, GLU MBConv FFN over the token grid, adaLN-single,
Gemma caption projection + RMSNorm) against diffusers' SanaTransformer2DModel: tiny random models the test builds
and saves, float32. The pipeline (Gemma's instruction and token selection, flow DPM-Solver) is issue 36's next
step; the DC-AE: tests/test_dc_ae.py."""
import numpy as np
import pytest

from lidit_jax.convert import diffusers_sana
from lidit_jax.models import sana

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("positions,patch,bias", [(None, 1, False), (1.0, 2, True)], ids=["sana", "sincos-patch2"])
def test_transformer_equals_diffusers_and_exports_bit_exact(tmp_path, positions, patch, bias):
  """Sana 1.0's layout (no positions, patch 1) and the options its 4K / other checkpoints use (sin-cos positions,
  patch 2, q / k / v biases), on a non-square grid with a padded caption."""
  import jax.numpy as jnp
  torch.manual_seed(0)
  ref = diffusers.SanaTransformer2DModel(
      in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
      num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
      mlp_ratio=2.5, sample_size=8, patch_size=patch, interpolation_scale=positions, attention_bias=bias).eval()
  with torch.no_grad():  # zero-initialised output layers would hide half the network
    for p in ref.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  ref.save_pretrained(tmp_path / "transformer")
  module, params = diffusers_sana.load(str(tmp_path / "transformer"))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 5, 12)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  t = np.array([999.0, 250.0], np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), encoder_hidden_states=torch.from_numpy(ctx),
               timestep=torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask),
               return_dict=False)[0].numpy().transpose(0, 2, 3, 1)
  got = module.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(mask > 0),
                     method=sana.forward)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, atol=1e-4)
  config, state = diffusers_sana.to_diffusers(module.cfg, params)
  src = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert set(state) == set(src)
  for k, v in state.items():
    np.testing.assert_array_equal(v, src[k], err_msg=k)
  assert diffusers_sana.config_from_diffusers(config) == module.cfg


def test_refuses_what_it_does_not_implement():
  with pytest.raises(ValueError, match="guidance_embeds=True"):  # Sana-Sprint
    diffusers_sana.config_from_diffusers({"_class_name": "SanaTransformer2DModel", "guidance_embeds": True})
  with pytest.raises(ValueError, match="qk_norm='rms_norm_across_heads'"):  # Sana 1.5
    diffusers_sana.config_from_diffusers({"_class_name": "SanaTransformer2DModel", "qk_norm": "rms_norm_across_heads"})
