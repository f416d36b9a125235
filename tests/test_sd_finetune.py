"""configs/sd15.py end to end on a tiny SD 1.5-style pipeline the test builds: convert -> the shared trainer
fine-tunes its U-Net (the pipeline's CLIP text side, caption dropout to the empty prompt) -> `export diffusers`
from the workdir -> diffusers loads the folder and the single file and samples the images `Pipeline` draws from
the workdir, from the same latents."""
import json
import os

import numpy as np
import pytest

from lidit_jax import configs, state, train
from lidit_jax.pipeline import Pipeline

from conftest import ROOT
from test_pipeline import _reference, sd15, sdxl

diffusers = pytest.importorskip("diffusers")


def sd_config(name, folder, **overrides):
  """configs/{name}.py on `folder`, shrunk: float32, the shapes data at the pipeline's 16 px, 3 steps."""
  c = configs.load_config_file(f"{ROOT / 'configs' / name}.py:{folder}")
  small = {"model.dtype": "float32", "data.source": "shapes", "data.caption_dropout": 0.5, "data.max_objects": 1,
           "train.num_steps": 3, "train.batch_size": 2, "train.log_every": 1, "train.checkpoint_every": 3,
           "sample.steps": 2, "sample.num_images": 1, "optim.lr": 1e-3, "optim.warmup_steps": 0,
           "optim.ema_decay": 0.0, **{f"text.towers.{n}.dtype": "float32" for n in c.text.towers}}
  return configs.validate(configs.apply_overrides(c, {**small, **overrides}))


def test_configs_read_the_pipeline_folder(tmp_path):
  sd15(tmp_path / "sd15")
  c = sd_config("sd15", tmp_path / "sd15")
  assert (c.data.image_size, c.autoencoder.factor, c.autoencoder.channels) == (16, 2, 4)
  assert tuple(c.unet.block_out_channels) == (16, 32) and tuple(c.unet.num_heads) == (4, 4)
  assert (c.sample.sampler, c.ddpm.beta_schedule, c.ddpm.steps_offset) == ("pndm", "scaled_linear", 1)
  assert c.conditioner.null == "empty_prompt" and c.unet.addition_embed_type == ""
  sdxl(tmp_path / "sdxl")
  c = sd_config("sdxl", tmp_path / "sdxl")
  assert (c.sample.sampler, c.conditioner.null, c.unet.addition_embed_type) == ("euler", "zeros", "text_time")
  assert tuple(c.unet.transformer_layers_per_block) == (1, 2) and c.unet.cross_attention_dim == 36
  for name, size, width in (("sd15", 512, 768), ("sdxl", 1024, 2048)):  # no folder: the released models' values
    default = configs.load_config_file(str(ROOT / "configs" / f"{name}.py"))
    assert (default.data.image_size, default.unet.cross_attention_dim) == (size, width)


def _embeds(ref, s, prompts, negative):
  """(ours, diffusers') prompt embeds, negative embeds (and pooled ones, SDXL) for `prompts`."""
  import torch
  feats = lambda texts: [np.asarray(f) for f in state.text_inputs(s.towers, s.frozen["towers"], s.text_for(texts))[0]]
  ours = []
  for texts in (prompts, [negative] * len(prompts)):
    f = feats(texts)
    hidden = [x for x, t in zip(f, s.towers) if not t.pooled]
    ours += [np.concatenate(hidden, axis=-1)] + [x[:, 0] for x, t in zip(f, s.towers) if t.pooled]
  with torch.no_grad():
    out = ref.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                            negative_prompt=[negative] * len(prompts))
  theirs = [out[0], out[1]] if len(out) == 2 else [out[0], out[2], out[1], out[3]]  # SDXL: pooled after each
  return ours, [t.numpy() for t in theirs]


@pytest.mark.parametrize("name,build", [("sd15", sd15), ("sdxl", sdxl)])
def test_finetune_then_export_reproduces_our_images(tmp_path, name, build):
  from lidit_jax import export
  from lidit_jax.convert.__main__ import main as convert_main
  ref = build(tmp_path / "pipe")
  assert convert_main(["diffusers", str(tmp_path / "pipe"), str(tmp_path / "ours")]) == 0
  config = sd_config(name, tmp_path / "ours")
  train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert len(losses) == 3 and np.isfinite(losses).all()
  s, params, _ = state.restore_for_inference(config, str(tmp_path / "run"))
  assert "null_context" not in params and "conditioner" not in params  # the text side is the pipeline's own
  start = {k: v.detach().numpy() for k, v in ref.unet.state_dict().items()}  # the U-Net trained away from it
  assert np.abs(np.asarray(params["denoiser"]["conv_out"]["bias"]) - start["conv_out.bias"]).max() > 1e-4

  pipe = Pipeline.from_pretrained(str(tmp_path / "run"))
  long = "a red circle " * 12  # over 77 CLIP tokens: truncated as diffusers' tokenizer call does
  prompts = ["a red circle", "blue square on the left", long]
  latents = np.random.default_rng(0).standard_normal((3, 8, 8, 4)).astype(np.float32)
  # guidance 20: the text (and the unconditional context) move these tiny models' images 10x the tolerance
  ours = pipe(prompts, num_steps=3, guidance=20.0, latents=latents)
  negative = pipe(prompts, num_steps=3, guidance=20.0, latents=latents, negative_prompt="green")
  empty = pipe(prompts, num_steps=3, guidance=20.0, latents=latents, negative_prompt="")
  # SD 1.x guides with "" by default, SDXL with zeros: at this guidance which one matters 10x the tolerance below
  assert np.abs(empty - ours).max() == pytest.approx(0.0, abs=1e-6) if name == "sd15" else (
      np.abs(empty - ours).max() > 1e-2)

  assert export.main(["diffusers", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
  back = type(ref).from_pretrained(str(tmp_path / "back"))
  # the text side exactly: our towers' features are diffusers' prompt embeds (and pooled ones), a negative's too
  for got, want in zip(*_embeds(back, s, prompts, "green")):
    np.testing.assert_allclose(got, want, atol=1e-5)
  want = _reference(back, prompts, latents, num_inference_steps=3, guidance_scale=20.0)
  assert want.std() > 0.02
  np.testing.assert_allclose(ours, want, atol=2e-3)
  np.testing.assert_allclose(negative, _reference(back, prompts, latents, num_inference_steps=3, guidance_scale=20.0,
                                                  negative_prompt=["green"] * 3), atol=2e-3)
  file = str(tmp_path / "sd.safetensors")
  assert export.main(["diffusers", str(tmp_path / "run"), file, "--format", "single-file"]) == 0
  single = type(ref).from_single_file(file, config=str(tmp_path / "pipe"), local_files_only=True,
                                      **({"safety_checker": None} if name == "sd15" else {}))
  np.testing.assert_allclose(_reference(single, prompts, latents, num_inference_steps=3, guidance_scale=20.0), ours,
                             atol=2e-3)


def test_export_diffusers_refuses_a_run_diffusers_cannot_run(tmp_path, capsys):
  """A LI-DiT run (refiners, learned null context) is no diffusers pipeline: refused by name, nothing written."""
  from lidit_jax import export
  from conftest import tiny_config
  os.makedirs(tmp_path / "run")
  (tmp_path / "run" / "config.json").write_text(tiny_config().to_json_best_effort())
  with pytest.raises(SystemExit) as e:
    export.main(["diffusers", str(tmp_path / "run"), str(tmp_path / "out")])
  assert e.value.code == 2 and "model.family='lidit' has no released pipeline layout" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # no run at all
    export.main(["diffusers", str(tmp_path), str(tmp_path / "out")])
  assert e.value.code == 2 and "no checkpoint in" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")
