"""configs/sd15.py end to end on a tiny SD 1.5-style pipeline the test builds: convert -> the shared trainer
fine-tunes its U-Net (the pipeline's CLIP text side, caption dropout to the empty prompt) -> `export diffusers`
from the workdir -> diffusers loads the folder and the single file and samples the images `Pipeline` draws from
the workdir, from the same latents."""
import json
import os

import jax
import numpy as np
import pytest

from lidit_jax import configs, state, train
from lidit_jax.pipeline import Pipeline

from conftest import ROOT
from test_pipeline import _reference, sd15

diffusers = pytest.importorskip("diffusers")


def sd15_config(folder, **overrides):
  c = configs.load_config_file(f"{ROOT / 'configs' / 'sd15.py'}:{folder}")
  small = {"model.dtype": "float32", "text.towers.clip.dtype": "float32", "data.source": "shapes",
           "data.caption_dropout": 0.5, "data.max_objects": 1, "train.num_steps": 3, "train.batch_size": 2, "train.log_every": 1,
           "train.checkpoint_every": 3, "sample.steps": 2, "sample.num_images": 1, "optim.lr": 1e-3,
           "optim.warmup_steps": 0, "optim.ema_decay": 0.0}
  return configs.validate(configs.apply_overrides(c, {**small, **overrides}))


def test_sd15_config_reads_the_pipeline_folder(tmp_path):
  sd15(tmp_path / "pipe")
  c = sd15_config(tmp_path / "pipe")
  assert (c.data.image_size, c.autoencoder.factor, c.autoencoder.channels) == (16, 2, 4)
  assert tuple(c.unet.block_out_channels) == (16, 32) and tuple(c.unet.num_heads) == (4, 4)
  assert (c.sample.sampler, c.ddpm.beta_schedule, c.ddpm.steps_offset) == ("pndm", "scaled_linear", 1)
  default = configs.load_config_file(str(ROOT / "configs" / "sd15.py"))  # no folder: SD 1.5's own values
  assert (default.data.image_size, tuple(default.unet.block_out_channels)) == (512, (320, 640, 1280, 1280))


def test_sd15_finetune_then_export_reproduces_our_images(tmp_path, capsys):
  from lidit_jax import export
  from lidit_jax.convert.__main__ import main as convert_main
  ref = sd15(tmp_path / "pipe")
  assert convert_main(["diffusers", str(tmp_path / "pipe"), str(tmp_path / "ours")]) == 0
  config = sd15_config(tmp_path / "ours")
  train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert len(losses) == 3 and np.isfinite(losses).all()
  s, params, _ = state.restore_for_inference(config, str(tmp_path / "run"))
  assert "null_context" not in params and "conditioner" not in params  # the text side is the pipeline's own
  # the U-Net trained away from the converted one
  start = {k: v.detach().numpy() for k, v in ref.unet.state_dict().items()}
  assert np.abs(np.asarray(params["denoiser"]["conv_out"]["bias"]) - start["conv_out.bias"]).max() > 1e-4

  pipe = Pipeline.from_pretrained(str(tmp_path / "run"))
  long = "a red circle " * 12  # over 77 CLIP tokens: truncated as diffusers' tokenizer call does
  prompts = ["a red circle", "blue square on the left", long]
  latents = np.random.default_rng(0).standard_normal((3, 8, 8, 4)).astype(np.float32)
  ours = pipe(prompts, num_steps=3, guidance=4.0, latents=latents, scheduler="pndm")
  negative = pipe(prompts, num_steps=3, guidance=4.0, latents=latents, negative_prompt="green")

  assert export.main(["diffusers", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
  back = type(ref).from_pretrained(str(tmp_path / "back"))
  # the text side, exactly: our tower's features of the prompts, "" and a negative prompt are diffusers' embeds
  import torch
  feats = lambda texts: np.asarray(state.text_inputs(s.towers, s.frozen["towers"], s.text_for(texts))[0][0])
  with torch.no_grad():
    embeds, empty = back.encode_prompt(prompts, "cpu", 1, True)
    _, green = back.encode_prompt(prompts, "cpu", 1, True, negative_prompt=["green"] * 3)
  for texts, want in ((prompts, embeds), ([""] * 3, empty), (["green"] * 3, green)):
    np.testing.assert_allclose(feats(texts), want.numpy(), atol=1e-5)
  assert np.abs(feats(["green"]) - feats([""])).max() > 0.1
  want = _reference(back, prompts, latents, num_inference_steps=3, guidance_scale=4.0)
  assert want.std() > 0.02
  np.testing.assert_allclose(ours, want, atol=2e-3)
  np.testing.assert_allclose(negative, _reference(back, prompts, latents, num_inference_steps=3, guidance_scale=4.0,
                                                  negative_prompt=["green"] * 3), atol=2e-3)
  file = str(tmp_path / "sd.safetensors")
  assert export.main(["diffusers", str(tmp_path / "run"), file, "--format", "single-file"]) == 0
  single = type(ref).from_single_file(file, config=str(tmp_path / "pipe"), local_files_only=True, safety_checker=None)
  np.testing.assert_allclose(_reference(single, prompts, latents, num_inference_steps=3, guidance_scale=4.0), ours,
                             atol=2e-3)


def test_export_diffusers_refuses_a_run_diffusers_cannot_run(tmp_path, capsys):
  """A LI-DiT run (refiners, learned null context) is no diffusers pipeline: refused by name, nothing written."""
  from lidit_jax import export
  from conftest import tiny_config
  os.makedirs(tmp_path / "run")
  (tmp_path / "run" / "config.json").write_text(tiny_config().to_json_best_effort())
  with pytest.raises(SystemExit) as e:
    export.main(["diffusers", str(tmp_path / "run"), str(tmp_path / "out")])
  assert e.value.code == 2 and "('lidit', 'refiners', 'learned')" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # no run at all
    export.main(["diffusers", str(tmp_path), str(tmp_path / "out")])
  assert e.value.code == 2 and "no checkpoint in" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")
