"""Lumina-Image 2.0's transformer (models/lumina2.py: context and noise refiners, joint attention with 3-axis RoPE,
GQA with QK-norm, SwiGLU, tanh-gated sandwich norms) against diffusers' Lumina2Transformer2DModel: a tiny random
model the test builds and saves, float32, with captions of different and of equal lengths (diffusers packs each
example's valid tokens; we mask the padding). The pipeline (Gemma's system prompt, the flow scheduler): issue 36's
next step."""
import numpy as np
import pytest

from lidit_jax.convert import diffusers_lumina2
from lidit_jax.models import lumina2

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def test_transformer_equals_diffusers_and_exports_bit_exact(tmp_path):
  import jax.numpy as jnp
  torch.manual_seed(0)
  ref = diffusers.Lumina2Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
      num_attention_heads=3, num_kv_heads=1, multiple_of=16, norm_eps=1e-5, axes_dim_rope=(4, 2, 2),
      axes_lens=(32, 16, 16), cap_feat_dim=12).eval()
  with torch.no_grad():  # zero-initialised output layers would hide half the network
    for p in ref.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  ref.save_pretrained(tmp_path / "transformer")
  module, params = diffusers_lumina2.load(str(tmp_path / "transformer"))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)  # a 4 x 6 token grid
  ctx = rng.standard_normal((2, 6, 12)).astype(np.float32)
  t = np.array([0.3, 0.9], np.float32)  # Lumina's time: 0 noise, 1 clean
  for mask in ([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]]):
    mask = np.array(mask)
    with torch.no_grad():
      want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx),
                 torch.from_numpy(mask), return_dict=False)[0].numpy().transpose(0, 2, 3, 1)
    got = module.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(mask > 0),
                       method=lumina2.forward)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  config, state = diffusers_lumina2.to_diffusers(module.cfg, params)
  src = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert set(state) == set(src)
  for k, v in state.items():
    np.testing.assert_array_equal(v, src[k], err_msg=k)
  assert diffusers_lumina2.config_from_diffusers(config) == module.cfg
