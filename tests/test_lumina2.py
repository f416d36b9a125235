"""Lumina-Image 2.0 (`model.family=lumina2`) against diffusers: its transformer (models/lumina2.py: context and noise
refiners, joint attention with 3-axis RoPE, GQA with QK-norm, SwiGLU, tanh-gated sandwich norms) against
Lumina2Transformer2DModel with captions of different and of equal lengths (diffusers packs each example's valid
tokens; we mask the padding), and tiny random pipeline folders the test builds and saves (Gemma2Model behind a word
tokenizer, Lumina2Transformer2DModel, an AutoencoderKL with a shift factor, FlowMatchEuler), float32:
Pipeline.from_pretrained(folder) draws Lumina2Pipeline's images from the same latents (the system prompt, negative
prompts without it, guidance with cfg_normalization); convert -> export is bit-exact; configs/lumina2.py fine-tunes,
resumes and exports a folder diffusers samples to our images."""
import numpy as np
import pytest

from lidit_jax import configs
from lidit_jax.convert import diffusers_lumina2
from lidit_jax.denoisers import lumina2 as lumina2_family
from lidit_jax.models import lumina2
from lidit_jax.pipeline import Pipeline

from conftest import (ROOT, convert_then_export, finetune_resume_export, lora_merged_into_diffusers,
                      pipeline_config_on_eight_devices)
from test_pixart import _randomise
from test_sana import PROMPTS, tiny_gemma
from test_sd_finetune import sd_config

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


def lumina2_pipeline(path):
  """A tiny Lumina 2 pipeline: Gemma-2 (width 16) behind the system prompt, a transformer at latent side 8 over a
  2x VAE with a shift factor (16 px images), FlowMatchEuler shifted by 3."""
  torch.manual_seed(6)
  tokenizer, gemma = tiny_gemma(lumina2_family.SYSTEM_PROMPT + " <Prompt Start> ")
  net = _randomise(diffusers.Lumina2Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
      num_attention_heads=3, num_kv_heads=1, multiple_of=16, norm_eps=1e-5, axes_dim_rope=(4, 2, 2),
      axes_lens=(300, 16, 16), cap_feat_dim=16), 0.6)
  vae = _randomise(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
      scaling_factor=0.3611, shift_factor=0.1159), 0.25)
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  diffusers.Lumina2Pipeline(tokenizer=tokenizer, text_encoder=gemma, vae=vae, transformer=net,
                            scheduler=scheduler).save_pretrained(path)
  return diffusers.Lumina2Pipeline.from_pretrained(path)


def _reference(pipe, prompts, latents_BHWC, **kw):
  latents = torch.from_numpy(np.ascontiguousarray(latents_BHWC.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return pipe(prompts, latents=latents, output_type="np", **kw).images


def test_images_equal_diffusers_lumina2(tmp_path):
  ref = lumina2_pipeline(tmp_path / "pipe")
  pipe = Pipeline.from_pretrained(str(tmp_path / "pipe"))
  assert pipe.defaults == dict(num_steps=30, guidance=4.0, height=16, width=16, sampler="flow_match_euler")
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  ours = pipe(PROMPTS, num_steps=4, guidance=4.0, latents=latents)
  want = _reference(ref, PROMPTS, latents, num_inference_steps=4, guidance_scale=4.0)
  assert ours.shape == want.shape == (2, 16, 16, 3) and want.std() > 0.02
  np.testing.assert_allclose(ours, want, atol=2e-3)
  other = _reference(ref, ["a blue square", "a red circle"], latents, num_inference_steps=4, guidance_scale=4.0)
  assert np.abs(other - want).max() > 10 * 2e-3  # the text visibly moves these images
  # a negative prompt (encoded without the system prompt), guidance on the first half of the steps only; off
  ours = pipe(PROMPTS, num_steps=4, guidance=3.0, latents=latents, negative_prompt="green", cfg_trunc=0.5)
  want = _reference(ref, PROMPTS, latents, num_inference_steps=4, guidance_scale=3.0, negative_prompt="green",
                    cfg_trunc_ratio=0.5)
  np.testing.assert_allclose(ours, want, atol=2e-3)
  every = _reference(ref, PROMPTS, latents, num_inference_steps=4, guidance_scale=3.0, negative_prompt="green")
  assert np.abs(every - want).max() > 10 * 2e-3  # the last two steps' guidance shows
  np.testing.assert_allclose(pipe(PROMPTS[:1], num_steps=2, guidance=1.0, latents=latents[:1]),
                             _reference(ref, PROMPTS[:1], latents[:1], num_inference_steps=2, guidance_scale=1.0),
                             atol=2e-3)


def test_convert_then_export_round_trips_bit_exact(tmp_path, capsys):
  lumina2_pipeline(tmp_path / "pipe")
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  reference = lambda folder: _reference(diffusers.Lumina2Pipeline.from_pretrained(folder), PROMPTS, latents,
                                        num_inference_steps=3, guidance_scale=4.0)
  convert_then_export(tmp_path, capsys, PROMPTS, latents, reference)


def test_config_without_the_folder_is_lumina_image_2():
  """Planning before converting: Lumina-Image-2.0's layout, Gemma-2-2B's 256 tokens."""
  from lidit_jax import plan
  c = configs.load_config_file(str(ROOT / "configs" / "lumina2.py"))
  assert (c.model.family, c.data.image_size, c.lumina2.num_layers, c.autoencoder.channels) == ("lumina2", 1024, 26, 16)
  assert (c.text.towers.gemma.max_length, c.sample.sampler, c.sample.cfg_renorm) == (256, "flow_match_euler", True)
  report = plan.plan(configs.validate(c, data=False), 8)
  assert 2.5e9 < report["trainable_params"] < 2.7e9  # Lumina-Image-2.0's 2.6 B transformer
  # On a TPU splash attention keeps no scores; XLA's kernel (this CPU) keeps 10.5 bytes per head, query and key of
  # the joint sequence (1024 px: 4096 image + 256 caption tokens) in every layer, the refiners' and the recomputed
  # working set's among them, for the 8 examples a device holds
  acts = {chip: plan.plan(c, 8, chip)["bytes_per_device"]["activations_estimate"] for chip in ("v5p", "cpu")}
  layers = c.lumina2.num_layers + c.lumina2.num_refiner_layers + lumina2_family.WORKING_LAYERS
  assert acts["cpu"] - acts["v5p"] == pytest.approx(8 * layers * 10.5 * 24 * 4352 ** 2, rel=1e-6)


def test_finetune_resumes_then_exports_our_images(tmp_path, monkeypatch):
  lumina2_pipeline(tmp_path / "pipe")
  config = sd_config("lumina2", tmp_path / "pipe", **{"train.checkpoint_every": 1})
  assert (config.data.image_size, config.conditioner.null, config.flow.shift) == (16, "empty_prompt", 3.0)
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  reference = lambda folder: _reference(diffusers.Lumina2Pipeline.from_pretrained(folder), PROMPTS, latents,
                                        num_inference_steps=3, guidance_scale=4.0)
  finetune_resume_export(tmp_path, monkeypatch, config, PROMPTS, latents, 4.0, reference)

def test_lora_run_exports_what_peft_merges_into_diffusers_transformer(tmp_path):
  """configs/lumina2.py with lora.rank: diffusers' `transformer.layers.N.attn.to_q` (and the refiners') LoRA keys,
  merged by peft into Lumina2Transformer2DModel, give our run's images."""
  ref = lumina2_pipeline(tmp_path / "pipe")
  config = sd_config("lumina2", tmp_path / "pipe", **{"lora.rank": 4, "optim.lr": 3e-2})
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  reference = lambda pipe: _reference(pipe, PROMPTS, latents, num_inference_steps=3, guidance_scale=4.0)
  lora_merged_into_diffusers(tmp_path, config, ref, reference, PROMPTS, latents, 4.0,
                             (2 + 1 + 1) * 4,  # (2 layers, a context and a noise refiner) x (q, k, v, out)
                             "transformer.context_refiner.0.attn.to_out.0.lora_B.weight")


@pytest.mark.slow
def test_finetune_on_eight_devices_follows_one(tmp_path):
  lumina2_pipeline(tmp_path / "pipe")
  pipeline_config_on_eight_devices("lumina2", tmp_path / "pipe", ["gemma"], tmp_path)
