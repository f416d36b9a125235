"""lidit_jax.pipeline.Pipeline against diffusers' own pipelines, image for image from the same initial latents:
tiny random SD 1.x-, SD 2.x- and SDXL-style pipeline folders the test builds and saves (U-Net, VAE, CLIP text encoders,
CLIP tokenizers, scheduler), float32."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lidit_jax.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

LETTERS = "abcdefghijklmnopqrstuvwxyz!"
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def _tokenizer(pad: str = "<|endoftext|>"):
  """A CLIP tokenizer over single letters (no merges): every word is its letters, the last with '</w>'."""
  vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
  for ch in LETTERS:
    vocab.setdefault(ch, len(vocab))
    vocab.setdefault(ch + "</w>", len(vocab))
  return transformers.CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad, model_max_length=77)


def _randomise(module, scale=0.2):
  with torch.no_grad():  # zero-initialised output layers would hide half the network
    for p in module.parameters():
      p.copy_(torch.randn_like(p) * scale)
  return module.eval()


def _clip(projection: bool, hidden: int, eos: int = 2):
  cfg = transformers.CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=2, num_attention_heads=2, projection_dim=12,
                                    max_position_embeddings=77, bos_token_id=1, eos_token_id=eos, pad_token_id=2)
  cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
  model = cls(cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  return model.eval()


def _vae():
  return _randomise(diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32), 0.1)


def sd15(path):
  torch.manual_seed(0)
  unet = _randomise(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, cross_attention_dim=24), 0.1)
  pipe = diffusers.StableDiffusionPipeline(
      vae=_vae(), text_encoder=_clip(False, 24), tokenizer=_tokenizer(), unet=unet,
      scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  return _saved(pipe, path)


def sd2(path):
  """SD 2.x-style: per-block head counts, linear projections, upcast attention, v-prediction with Euler."""
  torch.manual_seed(2)
  unet = _randomise(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
      upcast_attention=True, cross_attention_dim=24), 0.1)
  scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               steps_offset=1, prediction_type="v_prediction")
  pipe = diffusers.StableDiffusionPipeline(
      vae=_vae(), text_encoder=_clip(False, 24), tokenizer=_tokenizer(pad="!"), unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  return _saved(pipe, path)

def sdxl(path):
  torch.manual_seed(1)
  unet = _randomise(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
      layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
      transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=16 + 20,
      addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8),
      0.1)
  scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               steps_offset=1, timestep_spacing="leading")
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=_vae(), text_encoder=_clip(False, 16), text_encoder_2=_clip(True, 20, eos=2),
      tokenizer=_tokenizer(), tokenizer_2=_tokenizer(pad="!"), unet=unet, scheduler=scheduler,
      force_zeros_for_empty_prompt=True)
  return _saved(pipe, path)


def _saved(pipe, path):
  """Saved, and loaded back as a user's diffusers would (a loaded scheduler config holds every field it saved)."""
  pipe.save_pretrained(path)
  return type(pipe).from_pretrained(path)


def _reference(pipe, prompts, latents_BHWC, **kw):
  latents = torch.from_numpy(np.ascontiguousarray(latents_BHWC.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return pipe(prompts, latents=latents, output_type="np", **kw).images


@pytest.mark.parametrize("build", [sd15, sd2, sdxl], ids=["sd15", "sd2", "sdxl"])
def test_images_equal_diffusers_pipeline(tmp_path, build):
  ref = build(tmp_path / "pipe")
  pipe = Pipeline.from_pretrained(str(tmp_path / "pipe"), dtype=jnp.float32)
  assert (pipe.defaults["height"], pipe.defaults["width"]) == (16, 16)  # unet sample_size x the VAE's factor
  prompts = ["a red circle", "blue square on the left"]
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  ours = pipe(prompts, num_steps=4, guidance=6.0, latents=latents)
  want = _reference(ref, prompts, latents, num_inference_steps=4, guidance_scale=6.0)
  assert ours.shape == want.shape == (2, 16, 16, 3) and ours.dtype == np.float32
  assert want.std() > 0.02  # the tiny pipeline makes images with structure (10x the tolerance)
  np.testing.assert_allclose(ours, want, atol=2e-3)
  # a negative prompt, another scheduler on the folder's config, guidance off
  ours = pipe(prompts, num_steps=3, guidance=3.0, latents=latents, negative_prompt="green", scheduler="ddim")
  ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
  want = _reference(ref, prompts, latents, num_inference_steps=3, guidance_scale=3.0, negative_prompt=["green"] * 2)
  np.testing.assert_allclose(ours, want, atol=2e-3)
  ours = pipe(prompts[:1], num_steps=2, guidance=1.0, latents=latents[:1], scheduler="dpmpp_2m")
  ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
  want = _reference(ref, prompts[:1], latents[:1], num_inference_steps=2, guidance_scale=1.0)
  np.testing.assert_allclose(ours, want, atol=2e-3)


def test_seeds_batches_and_errors(tmp_path):
  sd15(tmp_path / "pipe")
  pipe = Pipeline.from_pretrained(str(tmp_path / "pipe"))
  prompts = ["a red circle", "a blue square", "green"]
  whole = pipe(prompts, num_steps=2, seed=3)
  batched = pipe(prompts, num_steps=2, seed=3, batch_size=2)  # two batches, the last padded
  np.testing.assert_allclose(batched, whole, atol=1e-5)  # image i's noise depends on (seed, i) only
  assert np.abs(pipe(prompts[:1], num_steps=2, seed=4) - whole[:1]).max() > 1e-2
  assert 0.0 <= whole.min() and whole.max() <= 1.0 and whole.std() > 0.05
  with pytest.raises(ValueError, match="latents: shape"):
    pipe(prompts, num_steps=2, latents=np.zeros((3, 4, 4, 4), np.float32))
  with pytest.raises(ValueError, match="scheduler='heun'"):
    pipe(prompts, num_steps=2, scheduler="heun")
  with pytest.raises(ValueError, match="negative_prompt: 2 given for 3"):
    pipe(prompts, num_steps=2, negative_prompt=["x", "y"])
  with pytest.raises(KeyError, match="neither a diffusers pipeline folder"):
    Pipeline.from_pretrained(str(tmp_path))
  assert json.load(open(tmp_path / "pipe" / "model_index.json"))["_class_name"] == "StableDiffusionPipeline"


def test_sample_cli_on_a_pipeline_folder_over_eight_devices(tmp_path):
  """`python -m lidit_jax.sample --workdir PIPELINE_FOLDER` on 8 simulated devices (the batch of 8 split over
  them) draws the images this process draws on one device."""
  import os
  import subprocess
  import sys
  from PIL import Image
  from conftest import ROOT
  from lidit_jax import sample
  sd15(tmp_path / "pipe")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  r = subprocess.run([sys.executable, "-m", "lidit_jax.sample", "--workdir", str(tmp_path / "pipe"),
                      "--prompt", "a red circle", "--prompt", "a blue square", "--num_images", "4", "--steps", "2",
                      "--negative_prompt", "green", "--out", str(tmp_path / "out")],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  files = sorted(os.listdir(tmp_path / "out"))
  assert len(files) == 2 and files[0].startswith("000_a_red_circle")
  want = sample.to_uint8(Pipeline.from_pretrained(str(tmp_path / "pipe"))(
      ["a blue square"] * 4, num_steps=2, negative_prompt="green", seed=0))
  # the CLI's image i of its flat list (prompt 1, image 0 is i = 4) has seed 0's noise i
  want_first = sample.to_uint8(Pipeline.from_pretrained(str(tmp_path / "pipe"))(
      ["a red circle"] * 4 + ["a blue square"], num_steps=2, negative_prompt="green", seed=0)[4])
  grid = np.asarray(Image.open(tmp_path / "out" / files[1]))
  tile = grid[2 * 4:(2 + 16) * 4:4, 2 * 4:(2 + 16) * 4:4]  # the first image of the grid, undone from 4x
  assert np.abs(tile.astype(int) - want_first.astype(int)).max() <= 1
  assert np.abs(tile.astype(int) - want[0].astype(int)).max() > 0  # another noise draws another image


@pytest.mark.parametrize("build", [sd15, sdxl], ids=["sd15", "sdxl"])
def test_convert_then_export_round_trip(tmp_path, build, capsys):
  """`convert diffusers` -> Pipeline on our folder draws the source's images; `export diffusers` -> diffusers
  loads the folder, holds the source's tensors exactly and samples our images."""
  from safetensors.numpy import load_file
  from lidit_jax import export
  from lidit_jax.convert.__main__ import main as convert_main
  build(tmp_path / "pipe")
  assert convert_main(["diffusers", str(tmp_path / "pipe"), str(tmp_path / "ours")]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert {"unet", "vae", "text_encoder"} <= set(report["components"])
  assert os.path.exists(tmp_path / "ours" / "unet" / "lidit_converted.json")
  prompts = ["a red circle", "blue square on the left"]
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  want = Pipeline.from_pretrained(str(tmp_path / "pipe"))(prompts, num_steps=3, guidance=4.0, latents=latents)
  ours = Pipeline.from_pretrained(str(tmp_path / "ours"))
  np.testing.assert_allclose(ours(prompts, num_steps=3, guidance=4.0, latents=latents), want, atol=1e-5)
  assert export.main(["diffusers", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
  for part, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
    src, back = (load_file(str(tmp_path / d / part / f"{file}.safetensors")) for d in ("pipe", "back"))
    # CLIP keys as SD's hub folders hold them ("text_model."), which transformers 4 and 5 both load
    unprefixed = lambda d: {k.removeprefix("text_model."): v for k, v in d.items()}
    src, back = unprefixed(src), unprefixed(back)
    assert set(back) == set(src) - {"embeddings.position_ids"}
    for k, v in back.items():
      np.testing.assert_array_equal(v, src[k], err_msg=f"{part}: {k}")
  cls = type(build(tmp_path / "again"))
  ref = cls.from_pretrained(str(tmp_path / "back"))
  np.testing.assert_allclose(_reference(ref, prompts, latents, num_inference_steps=3, guidance_scale=4.0), want,
                             atol=2e-3)
  with pytest.raises(SystemExit) as e:  # a pipeline folder the exporter did not write is refused, not merged
    export.main(["diffusers", str(tmp_path / "ours"), str(tmp_path / "again")])
  assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


ORIGINAL_TEXT_KEYS = {"sd15": ["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
                      "sd2": ["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"],
                      "sdxl": ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                               "conditioner.embedders.1.model.text_projection"]}


@pytest.mark.parametrize("build", [sd15, sd2, sdxl], ids=["sd15", "sd2", "sdxl"])
def test_single_file_export_and_convert_round_trip(tmp_path, capsys, build):
  """`export --format single-file` writes the original layout, which diffusers' from_single_file loads and samples
  to our images; `convert single-file` reads it (or its EMA copy) back to the same pipeline."""
  from safetensors.numpy import load_file, save_file
  from lidit_jax import export
  from lidit_jax.convert import diffusers_unet
  from lidit_jax.convert.__main__ import main as convert_main
  ref = build(tmp_path / "pipe")
  file = str(tmp_path / "sd.safetensors")
  assert export.main(["diffusers", str(tmp_path / "pipe"), file, "--format", "single-file"]) == 0
  keys = set(load_file(file))
  assert {"model.diffusion_model.out.2.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
          *ORIGINAL_TEXT_KEYS[build.__name__]} <= keys
  prompts = ["a red circle", "blue square on the left"]
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  want = Pipeline.from_pretrained(str(tmp_path / "pipe"))(prompts, num_steps=3, guidance=4.0, latents=latents)
  theirs = type(ref).from_single_file(file, config=str(tmp_path / "pipe"), local_files_only=True,
                                      **({} if build is sdxl else {"safety_checker": None}))
  np.testing.assert_allclose(_reference(theirs, prompts, latents, num_inference_steps=3, guidance_scale=4.0), want,
                             atol=2e-3)
  assert convert_main(["single-file", file, str(tmp_path / "ours"), "--config", str(tmp_path / "pipe")]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["components"]["unet"]["unused_tensors"] == []
  ours = Pipeline.from_pretrained(str(tmp_path / "ours"))
  np.testing.assert_allclose(ours(prompts, num_steps=3, guidance=4.0, latents=latents), want, atol=1e-5)
  if build is not sd15:
    return

  # The EMA copy (model_ema.*, dots dropped) is read with --ema, the plain one without
  state = load_file(file)
  state.update({diffusers_unet.ema_key(k): v * 0.5 for k, v in state.items() if k.startswith("model.diffusion_model.")})
  save_file(state, str(tmp_path / "ema.safetensors"))
  assert convert_main(["single-file", str(tmp_path / "ema.safetensors"), str(tmp_path / "ema"), "--ema",
                       "--config", str(tmp_path / "pipe")]) == 0
  _, plain = diffusers_unet.load_unet(str(tmp_path / "ours" / "unet"))
  _, ema = diffusers_unet.load_unet(str(tmp_path / "ema" / "unet"))
  jax_leaves = lambda t: [np.asarray(x) for x in __import__("jax").tree.leaves(t)]
  for a, b in zip(jax_leaves(ema), jax_leaves(plain)):
    np.testing.assert_array_equal(a, b * 0.5)
  capsys.readouterr()
  for argv, message in ((["--ema"], "no EMA weights"), (["--kind", "sdxl"], "--kind sdxl")):
    with pytest.raises(SystemExit) as e:
      convert_main(["single-file", file, str(tmp_path / "bad"), "--config", str(tmp_path / "pipe"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # an existing file the exporter did not write is not overwritten
    export.main(["diffusers", str(tmp_path / "pipe"), str(tmp_path / "ema.safetensors"), "--format", "single-file"])
  assert e.value.code == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_original_unet_layout_is_diffusers_own(tmp_path, kind):
  """Our original-layout U-Net keys are those diffusers' single-file converter maps back to its own state dict, and
  a file of them alone (no config) converts to the same parameters, its layout read from its shapes."""
  import jax
  from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
  from safetensors.numpy import save_file
  from lidit_jax.convert import diffusers_unet
  torch.manual_seed(0)
  kw = dict(sample_size=64, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24) if kind == "sd15" else dict(  # SD / XL head rules: 8 heads; 64 channels a head
      sample_size=128, block_out_channels=(64, 128, 128), layers_per_block=2, attention_head_dim=(1, 2, 2),
      down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
      up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), transformer_layers_per_block=(1, 2, 3),
      use_linear_projection=True, cross_attention_dim=32, addition_embed_type="text_time",
      addition_time_embed_dim=256, projection_class_embeddings_input_dim=12 + 6 * 256)
  ref = _randomise(diffusers.UNet2DConditionModel(**kw), 0.1)
  ref.save_pretrained(tmp_path / "unet")
  module, params = diffusers_unet.load_unet(str(tmp_path / "unet"))
  original = diffusers_unet.to_ldm(module.cfg, params)
  back = convert_ldm_unet_checkpoint(original, dict(ref.config))
  want = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert set(back) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(back[k]), v, err_msg=k)
  save_file(original, str(tmp_path / "unet.safetensors"))
  with pytest.raises(diffusers_unet.NotFound, match="no original SD checkpoint"):  # diffusers' own file, alone
    diffusers_unet.Conversion.prepare(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
  conv = diffusers_unet.Conversion.prepare(str(tmp_path / "unet.safetensors"))  # kind from its keys
  assert conv.cfg == module.cfg
  for a, b in zip(jax.tree.leaves(conv.run(jnp.float32)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
