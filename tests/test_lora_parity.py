"""LoRA files both ways against the PyTorch tools, on a tiny SD 1.5-style pipeline the test builds (no download):
a LoRA made with peft (attention projections and LoCon convolutions) and saved by diffusers in its layout, and in
kohya's, gives `Pipeline.load_lora` diffusers' `load_lora_weights` images from the same latents; a LoRA trained here
and written by `export lora` in both layouts loads into diffusers as the kernels our run merged."""
import jax
import numpy as np
import pytest

from lidit_jax import export, train
from lidit_jax.convert import diffusers_unet, hf_clip
from lidit_jax.pipeline import Pipeline

from test_lora_train import sd15_config
from test_pipeline import _reference, sd15

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

PROMPTS = ["a red circle", "blue square on the left"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]  # conv1: the resnets' 3x3 convolutions (LoCon)


TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def peft_lora(model, targets, rank: int, alpha: float, seed: int):
  """A peft LoRA on `model` with random B (B = 0 would leave the images as they are): (state dict, its config)."""
  config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
  peft.inject_adapter_in_model(config, model)  # transformers' own add_adapter asks for a newer peft
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.copy_(torch.randn_like(p) * 2.0)
  return peft.utils.get_peft_model_state_dict(model), config.to_dict()


def kohya(state: dict, prefix: str, alpha: float) -> dict:
  """peft's state dict of one model in kohya's layout (sd-scripts' SD 1.x names: diffusers' / transformers'
  modules, dots as _, after `lora_unet_` / `lora_te_`)."""
  out = {}
  for key, value in state.items():
    module, _, part = key.partition(".lora_")
    name = f"{prefix}_" + module.replace(".", "_")
    out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value.contiguous()
    out[f"{name}.alpha"] = torch.tensor(alpha)
  return out


def assert_fused_like_ours(ref, ours, before: dict) -> int:
  """diffusers' U-Net after `fuse_lora` equals our merged parameters (torch layout) module by module; returns how
  many weights the LoRA moved."""
  flat = {diffusers_unet.torch_key(tuple(k.key for k in p)): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(ours.backend.params["model"]["denoiser"])}
  moved = 0
  for key, w in ref.unet.state_dict().items():
    if key in flat:
      mine = flat[key]
      mine = mine.transpose(3, 2, 0, 1) if mine.ndim == 4 else mine.T if mine.ndim == 2 else mine
      np.testing.assert_allclose(w.numpy(), mine, rtol=1e-5, atol=1e-5, err_msg=key)
      moved += bool(np.abs(w.numpy() - before[key]).max() > 1e-3)
  return moved


def test_a_peft_lora_in_diffusers_and_kohya_layouts_gives_diffusers_images(tmp_path):
  from safetensors.torch import save_file
  sd15(tmp_path / "sd15")
  maker = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd15")
  state, config = peft_lora(maker.unet, TARGETS, 4, 8.0, seed=5)
  text_state, text_config = peft_lora(maker.text_encoder, TEXT_TARGETS, 2, 3.0, seed=6)
  diffusers.StableDiffusionPipeline.save_lora_weights(
      tmp_path / "lora", unet_lora_layers=state, unet_lora_adapter_metadata=config,
      text_encoder_lora_layers=text_state, text_encoder_lora_adapter_metadata=text_config)
  files = {"diffusers": tmp_path / "lora" / "pytorch_lora_weights.safetensors", "kohya": tmp_path / "kohya.safetensors"}
  save_file({**kohya(state, "lora_unet", 8.0), **kohya(text_state, "lora_te", 3.0)}, files["kohya"])
  convs = [k for k, v in state.items() if k.endswith("conv1.lora_A.weight") and v.ndim == 4]
  pairs = len(state) // 2
  assert convs and pairs - len(convs) == 4 * 2 * 4  # 4 transformer blocks (down, mid, 2 up) x 2 attentions x 4

  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kw = dict(num_steps=3, guidance=6.0, latents=latents)
  base = Pipeline.from_pretrained(str(tmp_path / "sd15"))(PROMPTS, **kw)
  for layout, path in files.items():
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd15")
    before = {k: v.numpy().copy() for k, v in ref.unet.state_dict().items()}
    text_before = {k.removeprefix("text_model."): v.numpy().copy() for k, v in ref.text_encoder.state_dict().items()}
    ref.load_lora_weights(str(path))
    assert any("lora" in n for n, _ in ref.text_encoder.named_parameters()), layout  # diffusers read that part
    want = _reference(ref, PROMPTS, latents, num_inference_steps=3, guidance_scale=6.0)
    ours = Pipeline.from_pretrained(str(tmp_path / "sd15")).load_lora(str(path))
    got = ours(PROMPTS, **kw)
    # This tiny pipeline's images follow its U-Net weakly (a prompt moves them by 2e-5): the LoRA moves them 100x
    # the text, and the exact check is the weights below.
    assert np.abs(want - base).max() > 1e-3, layout
    np.testing.assert_allclose(got, want, atol=2e-4, err_msg=layout)
    ref.fuse_lora()
    ref.unload_lora_weights()  # the fused weights stay, under their own names
    assert assert_fused_like_ours(ref, ours, before) == pairs, layout
    # the text encoder's fused projections are our tower's (through its converter's layout)
    ours_hf = hf_clip.to_hf(ours.backend.setup.towers[0].module.cfg, ours.backend.params["frozen"]["towers"]["clip"])[1]
    theirs = {k.removeprefix("text_model."): v for k, v in ours_hf.items()}  # transformers 5 has no text_model.
    moved = 0
    for key, w in ref.text_encoder.state_dict().items():
      key = key.removeprefix("text_model.")
      if key in theirs:
        np.testing.assert_allclose(w.numpy(), theirs[key], rtol=1e-5, atol=1e-5, err_msg=f"{layout} {key}")
        moved += bool(np.abs(w.numpy() - text_before[key]).max() > 1e-3)
    assert moved == len(text_state) // 2, layout


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_a_lora_trained_here_loads_into_diffusers_as_our_merged_kernels(layout, tmp_path):
  config = sd15_config(tmp_path, **{"lora.rank": 2, "lora.alpha": 3.0, "lora.conv_rank": 2, "optim.lr": 5e-2,
                                    "lora.targets": (r"attn[12]/(to_q|to_out_0)/kernel$", r"resnets_0/conv1/kernel$")})
  train.train_and_evaluate(config, str(tmp_path / "run"))
  out = export.export_lora(str(tmp_path / "run"), str(tmp_path / "lora.safetensors"), layout)
  ours = Pipeline.from_pretrained(str(tmp_path / "run"))
  ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd15")
  before = {k: v.numpy().copy() for k, v in ref.unet.state_dict().items()}
  ref.load_lora_weights(out)
  latents = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
  want = _reference(ref, PROMPTS, latents, num_inference_steps=3, guidance_scale=6.0)
  np.testing.assert_allclose(ours(PROMPTS, num_steps=3, guidance=6.0, latents=latents), want, atol=2e-4)
  ref.fuse_lora()
  ref.unload_lora_weights()
  # to_q and to_out.0 of both attentions of the 4 transformer blocks, and conv1 of each block's first resnet (5)
  assert assert_fused_like_ours(ref, ours, before) == 4 * 2 * 2 + 5
