"""LoRA files both ways against the PyTorch tools, on a tiny SD 1.5-style pipeline the test builds (no download):
a LoRA made with peft (attention projections and LoCon convolutions) and saved by diffusers in its layout, and in
kohya's, gives `Pipeline.load_lora` diffusers' `load_lora_weights` images from the same latents; a LoRA trained here
and written by `export lora` in both layouts loads into diffusers as the kernels our run merged."""
import jax
import numpy as np
import pytest

from lidit_jax import export, train
from lidit_jax.convert import diffusers_unet, hf_clip, safetensors_io
from lidit_jax.pipeline import Pipeline

from test_export_convert_safety import refused
from test_lora_train import sd15_config
from test_pipeline import _reference, sd15, sdxl

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
  """diffusers' U-Net after `fuse_lora` (a pipeline, or a U-Net's state dict) equals our merged parameters (torch
  layout) module by module; returns how many weights the LoRA moved."""
  flat = {diffusers_unet.torch_key(tuple(k.key for k in p)): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(ours.backend.params["model"]["denoiser"])}
  moved = 0
  fused = ref if isinstance(ref, dict) else ref.unet.state_dict()
  for key, w in fused.items():
    if key in flat:
      mine = flat[key]
      mine = mine.transpose(3, 2, 0, 1) if mine.ndim == 4 else mine.T if mine.ndim == 2 else mine
      np.testing.assert_allclose(w.numpy(), mine, rtol=1e-5, atol=1e-5, err_msg=key)
      moved += bool(np.abs(w.numpy() - before[key]).max() > 1e-3)
  return moved


def sgm(state: dict, cfg) -> dict:
  """A U-Net state dict under the original (SGM) module names kohya's SDXL files use (`input_blocks.4.1...`)."""
  modules = diffusers_unet.ldm_modules(cfg)
  out = {}
  for key, value in state.items():
    module, _, rest = key.partition(".lora_")
    out[diffusers_unet.ldm_key(module + ".weight", modules).removesuffix(".weight") + ".lora_" + rest] = value
  return out


def tower_like_ours(ref_encoder, ours, tower: str, before: dict, layout: str) -> int:
  """A diffusers text encoder after `fuse_lora` equals our tower (through its converter's layout); returns how
  many weights the LoRA moved."""
  t = next(t for t in ours.backend.setup.towers if t.name == tower)
  mine = safetensors_io.to_state_dict(hf_clip.plan(t.module.cfg), ours.backend.params["frozen"]["towers"][tower])
  moved = 0
  for key, w in ref_encoder.state_dict().items():
    key = key.removeprefix("text_model.")  # transformers 5 has no text_model.
    if key in mine:
      np.testing.assert_allclose(w.numpy(), mine[key], rtol=1e-5, atol=1e-5, err_msg=f"{layout} {tower} {key}")
      moved += bool(np.abs(w.numpy() - before[key]).max() > 1e-3)
  return moved


def state_of(module) -> dict:
  return {k.removeprefix("text_model."): v.numpy().copy() for k, v in module.state_dict().items()}


# (builder, pipeline class, its text encoders: (attribute, our tower, kohya prefix), kohya's U-Net names)
MODELS = {"sd15": (sd15, "StableDiffusionPipeline", [("text_encoder", "clip", "lora_te")], "diffusers"),
          "sdxl": (sdxl, "StableDiffusionXLPipeline",
                   [("text_encoder", "clip", "lora_te1"), ("text_encoder_2", "clip_2", "lora_te2")], "sgm")}


@pytest.mark.parametrize("model", MODELS)
def test_a_peft_lora_in_diffusers_and_kohya_layouts_gives_diffusers_images(model, tmp_path, capsys):
  from safetensors.torch import save_file
  build, cls, encoders, kohya_unet = MODELS[model]
  cls = getattr(diffusers, cls)
  build(tmp_path / model)
  maker = cls.from_pretrained(tmp_path / model)
  state, config = peft_lora(maker.unet, TARGETS, 4, 8.0, seed=5)
  texts = [peft_lora(getattr(maker, attr), TEXT_TARGETS, 2, 3.0 + i, seed=6 + i)
           for i, (attr, _, _) in enumerate(encoders)]
  layers = {f"{attr}_lora_layers": t[0] for (attr, _, _), t in zip(encoders, texts)}
  metadata = {f"{attr}_lora_adapter_metadata": t[1] for (attr, _, _), t in zip(encoders, texts)}
  cls.save_lora_weights(tmp_path / "lora", unet_lora_layers=state, unet_lora_adapter_metadata=config, **layers,
                        **metadata)
  files = {"diffusers": tmp_path / "lora" / "pytorch_lora_weights.safetensors", "kohya": tmp_path / "kohya.safetensors"}
  unet_names = (state if kohya_unet == "diffusers" else
                sgm(state, diffusers_unet.config_from_diffusers(maker.unet.config)))
  save_file({**kohya(unet_names, "lora_unet", 8.0),
             **{k: v for (_, _, prefix), (t, _), i in zip(encoders, texts, range(2))
                for k, v in kohya(t, prefix, 3.0 + i).items()}}, files["kohya"])
  convs = [k for k, v in state.items() if k.endswith("conv1.lora_A.weight") and v.ndim == 4]
  pairs = len(state) // 2
  assert convs and pairs > len(convs) >= 4

  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kw = dict(num_steps=3, guidance=6.0, latents=latents)
  base = Pipeline.from_pretrained(str(tmp_path / model))(PROMPTS, **kw)
  loaded = {}
  for layout, path in files.items():
    ref = cls.from_pretrained(tmp_path / model)
    before = {k: v.numpy().copy() for k, v in ref.unet.state_dict().items()}
    text_before = [state_of(getattr(ref, attr)) for attr, _, _ in encoders]
    ref.load_lora_weights(str(path))
    for attr, _, _ in encoders:  # diffusers read every part
      assert any("lora" in n for n, _ in getattr(ref, attr).named_parameters()), (layout, attr)
    want = _reference(ref, PROMPTS, latents, num_inference_steps=3, guidance_scale=6.0)
    ours = loaded[layout] = Pipeline.from_pretrained(str(tmp_path / model)).load_lora(str(path))
    got = ours(PROMPTS, **kw)
    # These tiny pipelines' images follow their U-Net weakly (a prompt moves SD 1.5's by 2e-5): the LoRA moves
    # them far more than the text, and the exact check is the weights below.
    ref.fuse_lora(components=["unet", *(attr for attr, _, _ in encoders)])
    ref.unload_lora_weights()  # the fused weights stay, under their own names
    assert assert_fused_like_ours(ref, ours, before) == pairs, layout
    for (attr, tower, _), (text_state, _), prior in zip(encoders, texts, text_before):
      assert tower_like_ours(getattr(ref, attr), ours, tower, prior, layout) == len(text_state) // 2, (layout, attr)
    assert np.abs(want - base).max() > 1e-3, layout
    np.testing.assert_allclose(got, want, atol=2e-4, err_msg=layout)

  # ComfyUI's names for the U-Net (`diffusion_model.` + the original layout's modules; diffusers reads none such):
  # the U-Net of the diffusers-layout file
  config_unet = diffusers_unet.config_from_diffusers(maker.unet.config)
  comfy = {f"diffusion_model.{k}": v.contiguous() for k, v in sgm(state, config_unet).items()}
  comfy.update({k.rpartition(".lora_")[0] + ".alpha": torch.tensor(8.0) for k in list(comfy)})
  save_file(comfy, tmp_path / "comfy.safetensors")
  via_comfy = Pipeline.from_pretrained(str(tmp_path / model)).load_lora(str(tmp_path / "comfy.safetensors"))
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(via_comfy.backend.params["model"]),
                       jax.tree.leaves(loaded["diffusers"].backend.params["model"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=str(p))

  # `export diffusers --merge-lora` (the last file, at scale 1): the folder holds diffusers' fused weights
  assert export.main(["diffusers", str(tmp_path / model), str(tmp_path / "merged"), "--merge-lora", str(path)]) == 0
  error = refused(capsys, export.main, "diffusers", tmp_path / model, tmp_path / "nothing", "--merge-lora",
                  tmp_path / "missing.safetensors:0.5")
  assert "missing.safetensors" in error and not (tmp_path / "nothing").exists()
  merged = cls.from_pretrained(tmp_path / "merged")
  for attr in ("unet", *(attr for attr, _, _ in encoders)):
    theirs = getattr(ref, attr).state_dict()
    for key, w in getattr(merged, attr).state_dict().items():
      np.testing.assert_allclose(w.numpy(), theirs[key].numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{attr} {key}")


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


@pytest.mark.parametrize("kind", ["LoHa", "LoKr"])
def test_lycoris_loha_and_lokr_in_kohya_layout_merge_as_peft_does(kind, tmp_path):
  """LyCORIS modules (closed forms over the same weights) in a kohya-style file merge into the U-Net as peft's own
  LoHa / LoKr layers merge (attention projections and convolutions). LoKr at rank 1, where peft splits the second
  Kronecker factor: there LyCORIS and peft both scale by alpha / r (with both factors whole LyCORIS does not scale,
  peft does; files follow LyCORIS, as diffusers' converter does)."""
  from safetensors.torch import save_file
  sd15(tmp_path / "sd15")
  unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "sd15" / "unet")
  before = {k: v.numpy().copy() for k, v in unet.state_dict().items()}
  config = getattr(peft, f"{kind}Config")(r=2 if kind == "LoHa" else 1, alpha=3.0, target_modules=TARGETS,
                                          init_weights=False)
  peft.inject_adapter_in_model(config, unet)
  torch.manual_seed(3)
  with torch.no_grad():  # factors large enough to move the weights visibly
    for name, p in unet.named_parameters():
      if "hada_" in name or "lokr_" in name:
        p.copy_(torch.randn_like(p) * 0.5)
  state = peft.utils.get_peft_model_state_dict(unet)
  assert kind == "LoHa" or any(k.endswith("lokr_w2_a") for k in state)  # the alpha / r case
  file = {}
  for key, value in state.items():
    module, _, part = key.rpartition(".")
    file[f"lora_unet_{module.replace('.', '_')}.{part}"] = value.contiguous()
    file[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(3.0)
  save_file(file, tmp_path / f"{kind}.safetensors")
  layers = [m for m in unet.modules() if isinstance(m, peft.tuners.lycoris_utils.LycorisLayer)]
  for m in layers:
    m.merge()
  fused = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items()
           if "hada_" not in k and "lokr_" not in k}
  ours = Pipeline.from_pretrained(str(tmp_path / "sd15")).load_lora(str(tmp_path / f"{kind}.safetensors"))
  assert assert_fused_like_ours(fused, ours, before) == len(layers) > 30
