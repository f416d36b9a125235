"""models/unet.py against diffusers' UNet2DConditionModel on tiny random models saved by the test (SD 1.x-,
SD 2.x- and SDXL-style; with and without padded text): the same outputs within 1e-4 in float32."""
import jax.numpy as jnp
import numpy as np
import pytest

from lidit_jax.convert import diffusers_unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

COMMON = dict(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8, layers_per_block=1)
LAYOUTS = {
    # SD 1.x: one head count for every block, conv projections
    "sd1": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, cross_attention_dim=24,
                layers_per_block=2),
    # SD 2.x: per-block heads, linear projections, upcast attention, three blocks
    "sd2": dict(block_out_channels=(16, 32, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                                  "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4, 4),
                use_linear_projection=True, upcast_attention=True, cross_attention_dim=20),
    # SDXL: Down first, transformer depth per block, pooled text + time ids
    "sdxl": dict(block_out_channels=(16, 32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                   "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 2, 4),
                 transformer_layers_per_block=(1, 2, 2), use_linear_projection=True, cross_attention_dim=32,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=12 + 6 * 8),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def saved(request, tmp_path_factory):
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(**{**COMMON, **LAYOUTS[request.param]}).eval()
  with torch.no_grad():  # zero-initialised output layers would hide half the network: randomise every tensor
    for p in ref.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  path = tmp_path_factory.mktemp(request.param) / "unet"
  ref.save_pretrained(path)
  return request.param, ref, str(path)


@pytest.mark.parametrize("padded", [False, True])
def test_unet_matches_diffusers(saved, padded):
  name, ref, path = saved
  module, params = diffusers_unet.load_unet(path, jnp.float32)
  rng = np.random.default_rng(1)
  b, s, d = 2, 7, ref.config.cross_attention_dim
  x = rng.standard_normal((b, 16, 16, 4)).astype(np.float32)
  t = np.array([981.0, 3.0], np.float32)
  ctx = rng.standard_normal((b, s, d)).astype(np.float32)
  valid = np.ones((b, s), bool)
  if padded:
    valid[0, 4:] = False
    valid[1, 6:] = False
  kw, ref_kw = {}, {}
  if name == "sdxl":
    pooled = rng.standard_normal((b, 12)).astype(np.float32)
    ids = np.array([[16, 16, 0, 0, 16, 16], [32, 24, 2, 1, 16, 16]], np.float32)
    kw = dict(text_embeds=jnp.asarray(pooled), time_ids=jnp.asarray(ids))
    ref_kw = dict(added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(ids)})
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx),
               encoder_attention_mask=torch.from_numpy(valid.astype(np.float32)) if padded else None,
               **ref_kw).sample.permute(0, 2, 3, 1).numpy()
  got = np.asarray(module.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                                jnp.asarray(valid) if padded else None, **kw))
  assert np.abs(want).mean() > 0.1  # a real signal, not a zero output
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  if padded:  # the padded keys matter: without the mask the outputs differ
    unmasked = np.asarray(module.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), None, **kw))
    assert np.abs(unmasked - got).max() > 1e-3
