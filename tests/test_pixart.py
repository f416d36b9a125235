"""PixArt-alpha / Sigma (`model.family=pixart`) against diffusers: tiny random pipeline folders the test builds and
saves (PixArtTransformer2DModel, T5EncoderModel, a case-sensitive T5-style tokenizer, AutoencoderKL, DPM-Solver++),
float32. Pipeline.from_pretrained(folder) draws diffusers' images from the same latents (its schedulers, guidance,
negative prompts, alpha's micro-conditions); convert -> export is bit-exact; configs/pixart_sigma.py fine-tunes,
resumes, follows one device on eight, and exports a folder diffusers samples to our images."""
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from lidit_jax import configs
from lidit_jax.data import shapes
from lidit_jax.pipeline import Pipeline

from conftest import (ROOT, convert_then_export, finetune_resume_export, lora_merged_into_diffusers,
                      pipeline_config_on_eight_devices)
from test_sd_finetune import sd_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

WORDS = sorted(set(shapes.VOCABULARY) | {"A", "Red", "Blue"})  # capitals: PixArt lower-cases the prompt first


def _t5_tokenizer():
  """Word-level and case-sensitive, with T5's conventions: <pad> 0, </s> 1 appended, <unk> 2."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                              unk_token="<unk>", model_max_length=300)


def _randomise(module, scale):
  with torch.no_grad():  # zero-initialised output layers would hide half the network
    for p in module.parameters():
      p.copy_(torch.randn_like(p) * scale)
  return module.eval()


def pixart(path, sigma: bool = True, binned: bool = False):
  """A tiny PixArt-Sigma pipeline (latent side 8, 16 px images through a 2x VAE), or PixArt-alpha at latent side
  128, where its pipeline passes the resolution / aspect-ratio micro-conditions (sampled at a small size).
  `binned`: Sigma at latent side 32 through an 8x VAE, the layout of its 256 px resolution bins."""
  torch.manual_seed(3 if sigma else 4)
  blocks = 4 if binned else 2
  t5 = _randomise(transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=len(WORDS) + 3, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
      relative_attention_num_buckets=8, relative_attention_max_distance=16, is_encoder_decoder=False)), 0.5)
  net = _randomise(diffusers.PixArtTransformer2DModel(
      num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2, caption_channels=16,
      cross_attention_dim=24, sample_size=32 if binned else 8 if sigma else 128, patch_size=2), 0.2)
  vae = _randomise(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * (blocks - 1) + (16,),
      norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * blocks,
      up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=32), 0.1)
  scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
  cls = diffusers.PixArtSigmaPipeline if sigma else diffusers.PixArtAlphaPipeline
  cls(tokenizer=_t5_tokenizer(), text_encoder=t5, vae=vae, transformer=net, scheduler=scheduler).save_pretrained(path)
  return cls.from_pretrained(path)


def _reference(pipe, prompts, latents_BHWC, binning: bool = False, **kw):
  """diffusers' images at the size asked (no resolution binning unless asked: the tiny models have no bins) from
  the prompts as given (no caption cleaning: bs4 / ftfy are not installed; both pipelines lower-case either way)."""
  latents = torch.from_numpy(np.ascontiguousarray(latents_BHWC.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return pipe(prompts, latents=latents, output_type="np", use_resolution_binning=binning, clean_caption=False,
                **kw).images


PROMPTS = ["A Red circle left of a blue square", "a green triangle"]


def test_images_equal_diffusers_pixart_sigma(tmp_path):
  ref = pixart(tmp_path / "pipe")
  pipe = Pipeline.from_pretrained(str(tmp_path / "pipe"))
  assert pipe.defaults == dict(num_steps=20, guidance=4.5, height=16, width=16, sampler="dpmpp_2m")
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  ours = pipe(PROMPTS, num_steps=4, guidance=4.5, latents=latents)
  want = _reference(ref, PROMPTS, latents, num_inference_steps=4, guidance_scale=4.5)
  assert ours.shape == want.shape == (2, 16, 16, 3) and want.std() > 0.02
  np.testing.assert_allclose(ours, want, atol=2e-3)
  other = _reference(ref, ["a blue square", "a red circle"], latents, num_inference_steps=4, guidance_scale=4.5)
  assert np.abs(other - want).max() > 10 * 2e-3  # the text visibly moves these images
  # a negative prompt with another scheduler on the folder's config (DDIM, Euler), guidance off (DPM-Solver++)
  for name, cls in (("ddim", diffusers.DDIMScheduler), ("euler", diffusers.EulerDiscreteScheduler)):
    ref.scheduler = cls.from_config(ref.scheduler.config)
    ours = pipe(PROMPTS, num_steps=3, guidance=3.0, latents=latents, negative_prompt="green", scheduler=name)
    want = _reference(ref, PROMPTS, latents, num_inference_steps=3, guidance_scale=3.0, negative_prompt="green")
    np.testing.assert_allclose(ours, want, atol=2e-3, err_msg=name)
  ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
  np.testing.assert_allclose(pipe(PROMPTS[:1], num_steps=2, guidance=1.0, latents=latents[:1]),
                             _reference(ref, PROMPTS[:1], latents[:1], num_inference_steps=2, guidance_scale=1.0),
                             atol=2e-3)


def test_images_equal_diffusers_pixart_alpha_with_micro_conditions(tmp_path):
  """PixArt-alpha 1024's layout (latent side 128: interpolated positions, resolution and aspect-ratio embeddings)
  at a small non-square size: 120 tokens, the image's size as its micro-conditions."""
  ref = pixart(tmp_path / "pipe", sigma=False)
  pipe = Pipeline.from_pretrained(str(tmp_path / "pipe"))
  c = pipe.backend.setup.config
  assert (c.text.towers.t5.max_length, c.pixart.use_additional_conditions, c.pixart.interpolation_scale) == (120, True, 2.0)
  latents = np.random.default_rng(1).standard_normal((2, 8, 12, 4)).astype(np.float32)
  assert c.sample.resolution_bins == 1024  # latent side 128: the 1024 px bins, which the small size leaves off
  ours = pipe(PROMPTS, num_steps=3, guidance=4.5, latents=latents, height=16, width=24, resolution_binning=False)
  want = _reference(ref, PROMPTS, latents, num_inference_steps=3, guidance_scale=4.5, height=16, width=24)
  assert ours.shape == (2, 16, 24, 3) and want.std() > 0.02
  np.testing.assert_allclose(ours, want, atol=2e-3)


def test_resolution_binning_draws_the_bin_and_resizes_as_diffusers(tmp_path):
  """Latent side 32: the 256 px bins. 40 x 64 px asked is drawn at its bin, 192 x 320 (24 x 40 latents), then
  resized to cover 40 x 64 and centre-cropped; a bad latent shape names the bin."""
  ref = pixart(tmp_path / "pipe", binned=True)
  pipe = Pipeline.from_pretrained(str(tmp_path / "pipe"))
  assert pipe.backend.setup.config.sample.resolution_bins == 256
  latents = np.random.default_rng(2).standard_normal((1, 24, 40, 4)).astype(np.float32)
  ours = pipe(PROMPTS[:1], num_steps=2, guidance=4.5, latents=latents, height=40, width=64)
  want = _reference(ref, PROMPTS[:1], latents, binning=True, num_inference_steps=2, guidance_scale=4.5, height=40,
                    width=64)
  assert ours.shape == want.shape == (1, 40, 64, 3) and want.std() > 0.02
  np.testing.assert_allclose(ours, want, atol=2e-3)
  assert pipe.noise([jax.random.key(0)], 40, 64).shape == latents.shape
  with pytest.raises(ValueError, match=r"192 x 320 px, the bin of 40 x 64"):
    pipe(PROMPTS[:1], latents=latents[:, :5], height=40, width=64)


def test_convert_then_export_round_trips_bit_exact(tmp_path, capsys):
  pixart(tmp_path / "pipe")
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  reference = lambda folder: _reference(diffusers.PixArtSigmaPipeline.from_pretrained(folder), PROMPTS, latents,
                                        num_inference_steps=3, guidance_scale=4.5)
  convert_then_export(tmp_path, capsys, PROMPTS, latents, reference,
                      dropped={"encoder.embed_tokens.weight"})  # T5's tied embedding: written once


def test_config_without_the_folder_is_pixart_sigma_1024():
  """Planning before converting: PixArt-Sigma-XL-2-1024-MS's layout, T5-XXL's 300 tokens."""
  from lidit_jax import plan
  c = configs.load_config_file(str(ROOT / "configs" / "pixart_sigma.py"))
  assert (c.model.family, c.data.image_size, c.pixart.num_attention_heads * c.pixart.attention_head_dim) == (
      "pixart", 1024, 1152)
  assert (c.text.towers.t5.max_length, c.sample.sampler, c.sample.cfg) == (300, "dpmpp_2m", 4.5)
  report = plan.plan(configs.validate(c, data=False), 8)
  assert 600e6 < report["trainable_params"] < 615e6  # PixArt-Sigma's 0.61 B transformer


def test_finetune_resumes_then_exports_our_images(tmp_path, monkeypatch):
  pixart(tmp_path / "pipe")
  config = sd_config("pixart_sigma", tmp_path / "pipe", **{"train.checkpoint_every": 1})
  assert (config.data.image_size, config.conditioner.null, config.pixart.learn_sigma) == (16, "empty_prompt", True)
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  reference = lambda folder: _reference(diffusers.PixArtSigmaPipeline.from_pretrained(folder), PROMPTS, latents,
                                        num_inference_steps=3, guidance_scale=4.5)
  finetune_resume_export(tmp_path, monkeypatch, config, PROMPTS, latents, 4.5, reference)
  # IDDPM's bound trained the learned-variance outputs too (proj_out rows (p, p, channel): channels 4.. of 8)
  weight = lambda d: load_file(str(tmp_path / d / "transformer" / "diffusion_pytorch_model.safetensors"))[
      "proj_out.weight"].reshape(2, 2, 8, -1)
  moved = np.abs(weight("back") - weight("pipe")).max(axis=(0, 1, 3))
  assert moved[4:].min() > 1e-4 and moved[:4].min() > 1e-4, moved  # Adam's steps (lr 1e-3); weight decay: ~1e-5


@pytest.mark.slow
def test_finetune_on_eight_devices_follows_one(tmp_path):
  pixart(tmp_path / "pipe")
  pipeline_config_on_eight_devices("pixart_sigma", tmp_path / "pipe", ["t5"], tmp_path)


def test_lora_run_exports_what_peft_merges_into_diffusers_transformer(tmp_path):
  """configs/pixart_sigma.py with lora.rank: `export lora` writes diffusers' `transformer.transformer_blocks.N.
  attn1.to_q.lora_A.weight` keys and LoraConfig metadata; peft injected into diffusers' transformer, loaded and
  merged, samples the images of our run."""
  ref = pixart(tmp_path / "pipe")
  config = sd_config("pixart_sigma", tmp_path / "pipe", **{"lora.rank": 4, "optim.lr": 3e-2})
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  reference = lambda pipe: _reference(pipe, PROMPTS, latents, num_inference_steps=3, guidance_scale=4.5)
  lora_merged_into_diffusers(tmp_path, config, ref, reference, PROMPTS, latents, 4.5,
                             2 * 2 * 4,  # 2 blocks x (self, cross) x (q, k, v, out)
                             "transformer.transformer_blocks.1.attn2.to_out.0.lora_B.weight")
