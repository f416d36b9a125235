"""Sana (`model.family=sana`) against diffusers: its transformer (models/sana.py: ReLU linear self-attention, GLU
MBConv FFN over the token grid, adaLN-single, Gemma caption projection + RMSNorm) against SanaTransformer2DModel,
and tiny random pipeline folders the test builds and saves (Gemma2Model behind a word tokenizer with a BOS,
SanaTransformer2DModel, AutoencoderDC, DPM-Solver++ in flow mode), float32: Pipeline.from_pretrained(folder)
draws SanaPipeline's images from the same latents (the complex human instruction and its token selection, negative
prompts without it, its schedulers); convert -> export is bit-exact; configs/sana.py fine-tunes, resumes and
exports a folder diffusers samples to our images. The DC-AE alone: tests/test_dc_ae.py."""
import numpy as np
import pytest

from lidit_jax import configs, prompt
from lidit_jax.convert import diffusers_sana
from lidit_jax.data import shapes
from lidit_jax.denoisers import sana as sana_family
from lidit_jax.models import sana
from lidit_jax.pipeline import Pipeline

from conftest import (ROOT, convert_then_export, finetune_resume_export, lora_merged_into_diffusers,
                      pipeline_config_on_eight_devices)
from test_pixart import _randomise
from test_sd_finetune import sd_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["A Red circle left of a blue square", "a green triangle"]


def tiny_gemma(instruction: str):
  """A word tokenizer with a BOS (knowing the demo's words and the instruction's) and a random Gemma2Model over it
  (width 16, eager attention: its logit soft-capping)."""
  tokenizer = prompt.build_word_tokenizer([instruction, *shapes.VOCABULARY])
  gemma = _randomise(transformers.Gemma2Model(transformers.Gemma2Config(
      vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=64, pad_token_id=0, bos_token_id=2,
      eos_token_id=3, attn_implementation="eager")), 0.3)
  return tokenizer, gemma


def sana_pipeline(path):
  """A tiny Sana pipeline: Gemma-2 (width 16) reading the instruction + prompt, a transformer at latent side 8
  over a 4x DC-AE (32 px images), DPM-Solver++ over flow sigmas shifted by 3."""
  torch.manual_seed(5)
  tokenizer, gemma = tiny_gemma(sana_family.INSTRUCTION)
  net = _randomise(diffusers.SanaTransformer2DModel(
      in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
      num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
      sample_size=8, patch_size=1), 0.5)
  ae = _randomise(diffusers.AutoencoderDC(
      in_channels=3, latent_channels=4, attention_head_dim=4,
      encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
      decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
      encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
      encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
      encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)), scaling_factor=0.4), 0.1)
  scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                    prediction_type="flow_prediction")
  diffusers.SanaPipeline(tokenizer=tokenizer, text_encoder=gemma, vae=ae, transformer=net,
                         scheduler=scheduler).save_pretrained(path)
  return diffusers.SanaPipeline.from_pretrained(path)


def _reference(pipe, prompts, latents_BHWC, **kw):
  """diffusers' images at the size asked (no resolution binning) from the prompts lower-cased (no caption cleaning:
  bs4 / ftfy are not installed)."""
  latents = torch.from_numpy(np.ascontiguousarray(latents_BHWC.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return pipe(prompts, latents=latents, output_type="np", use_resolution_binning=False, clean_caption=False,
                **kw).images


def test_images_equal_diffusers_sana(tmp_path):
  ref = sana_pipeline(tmp_path / "pipe")
  pipe = Pipeline.from_pretrained(str(tmp_path / "pipe"))
  assert pipe.defaults == dict(num_steps=20, guidance=4.5, height=32, width=32, sampler="dpmpp_2m")
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  ours = pipe(PROMPTS, num_steps=4, guidance=4.5, latents=latents)
  want = _reference(ref, PROMPTS, latents, num_inference_steps=4, guidance_scale=4.5)
  assert ours.shape == want.shape == (2, 32, 32, 3) and want.std() > 0.02
  np.testing.assert_allclose(ours, want, atol=2e-3)
  other = _reference(ref, ["a blue square", "a red circle"], latents, num_inference_steps=4, guidance_scale=4.5)
  assert np.abs(other - want).max() > 10 * 2e-3  # the text visibly moves these images
  # a negative prompt (encoded without the instruction) with flow-matching Euler at the folder's shift
  ref.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  ours = pipe(PROMPTS, num_steps=3, guidance=3.0, latents=latents, negative_prompt="green",
              scheduler="flow_match_euler")
  want = _reference(ref, PROMPTS, latents, num_inference_steps=3, guidance_scale=3.0, negative_prompt="green")
  np.testing.assert_allclose(ours, want, atol=2e-3)
  ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)


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


def test_convert_then_export_round_trips_bit_exact(tmp_path, capsys):
  sana_pipeline(tmp_path / "pipe")
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  reference = lambda folder: _reference(diffusers.SanaPipeline.from_pretrained(folder), PROMPTS, latents,
                                        num_inference_steps=3, guidance_scale=4.5)
  convert_then_export(tmp_path, capsys, PROMPTS, latents, reference)


def test_config_without_the_folder_is_sana_1600m_1024():
  """Planning before converting: Sana 1600M 1024's layout, Gemma-2-2B's 300 kept tokens."""
  from lidit_jax import plan
  c = configs.load_config_file(str(ROOT / "configs" / "sana.py"))
  assert (c.model.family, c.data.image_size, c.sana.num_layers, c.autoencoder.factor) == ("sana", 1024, 20, 32)
  assert (c.text.towers.gemma.max_length, c.sample.sampler, c.sample.shift, c.objective.kind) == (
      300, "dpmpp_2m", 3.0, "rectified_flow")
  report = plan.plan(configs.validate(c, data=False), 8)
  assert 1.55e9 < report["trainable_params"] < 1.65e9  # Sana 1600M's transformer


def test_finetune_resumes_then_exports_our_images(tmp_path, monkeypatch):
  sana_pipeline(tmp_path / "pipe")
  config = sd_config("sana", tmp_path / "pipe", **{"train.checkpoint_every": 1})
  assert (config.data.image_size, config.conditioner.null, config.flow.shift) == (32, "empty_prompt", 3.0)
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  reference = lambda folder: _reference(diffusers.SanaPipeline.from_pretrained(folder), PROMPTS, latents,
                                        num_inference_steps=3, guidance_scale=4.5)
  finetune_resume_export(tmp_path, monkeypatch, config, PROMPTS, latents, 4.5, reference)

def test_lora_run_exports_what_peft_merges_into_diffusers_transformer(tmp_path):
  """configs/sana.py with lora.rank: diffusers' `transformer.transformer_blocks.N.attn1.to_q` LoRA keys, merged by
  peft into SanaTransformer2DModel, give our run's images."""
  ref = sana_pipeline(tmp_path / "pipe")
  config = sd_config("sana", tmp_path / "pipe", **{"lora.rank": 4, "optim.lr": 3e-2})
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  reference = lambda pipe: _reference(pipe, PROMPTS, latents, num_inference_steps=3, guidance_scale=4.5)
  lora_merged_into_diffusers(tmp_path, config, ref, reference, PROMPTS, latents, 4.5,
                             2 * 2 * 4,  # 2 blocks x (self, cross) x (q, k, v, out)
                             "transformer.transformer_blocks.1.attn1.to_out.0.lora_B.weight")


@pytest.mark.slow
def test_finetune_on_eight_devices_follows_one(tmp_path):
  sana_pipeline(tmp_path / "pipe")
  pipeline_config_on_eight_devices("sana", tmp_path / "pipe", ["gemma"], tmp_path)
