"""LLM4GEN's Cross-Adapter Module: the released module restated in PyTorch from its facts (PAPERS.md section 4),
saved as `projector.pth` and as safetensors, read by `load_llm4gen_cam` to the same fused context."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")


class ReleasedBlock(torch.nn.Module):
  """One `CrossFusionModule` entry as released: names swapped (q_norm normalises CLIP, which gives keys and
  values), no mask, no lambda, CLIP tokens first."""

  def __init__(self, clip_dim, llm_dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.llm_proj = torch.nn.Linear(llm_dim, clip_dim)
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (torch.nn.Linear(clip_dim, clip_dim) for _ in range(4))
    self.q_norm, self.kv_norm, self.norm = (torch.nn.LayerNorm(clip_dim) for _ in range(3))
    self.FFN = torch.nn.Sequential(torch.nn.Linear(clip_dim, 4 * clip_dim), QuickGELU(),
                                   torch.nn.Linear(4 * clip_dim, clip_dim))

  def forward(self, clip, llm):
    llm = self.llm_proj(llm)
    q, k, v = self.q_proj(self.kv_norm(llm)), self.k_proj(self.q_norm(clip)), self.v_proj(self.q_norm(clip))
    split = lambda x: x.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
    llm = self.out_proj(attn.transpose(1, 2).reshape(llm.shape)) + llm
    llm = self.FFN(self.norm(llm)) + llm
    return torch.cat([clip, llm], dim=1)


class QuickGELU(torch.nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


def released(**dims):
  """The released module with random weights, norms and biases off their identity / zero inits too."""
  torch.manual_seed(0)
  module = Released(**dims).eval()
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm.weight" in name else 0.0))
  return module


class Released(torch.nn.Module):
  def __init__(self, clip_dim=24, llm_dim=40, num_heads=4):
    super().__init__()
    self.CrossFusionModule = torch.nn.ModuleList([ReleasedBlock(clip_dim, llm_dim, num_heads)])

  def forward(self, clip, llm):
    return self.CrossFusionModule[0](clip, llm)


def test_load_llm4gen_cam_gives_the_released_fused_context(tmp_path):
  import jax.numpy as jnp
  from safetensors.torch import save_file
  from lidit_jax.cli import UserError
  from lidit_jax.convert import load_llm4gen_cam
  ref = released()
  state = ref.state_dict()
  assert len(state) == 20
  torch.save(state, tmp_path / "projector.pth")
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "projector.safetensors"))
  clip = np.random.default_rng(0).standard_normal((2, 7, 24)).astype(np.float32)
  llm = np.random.default_rng(1).standard_normal((2, 6, 40)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(clip), torch.from_numpy(llm)).numpy()
  with pytest.raises(UserError, match="allow_pickle=True"):  # a pickle needs consent
    load_llm4gen_cam(str(tmp_path / "projector.pth"))
  for path, kw in (("projector.pth", {"allow_pickle": True}), ("projector.safetensors", {})):
    cam, params = load_llm4gen_cam(str(tmp_path / path), dtype=jnp.float32, num_heads=4, **kw)
    got = np.asarray(cam.apply({"params": params}, clip, llm))
    assert got.shape == (2, 13, 24)
    np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(want[:, 7:] - want[:, 7:].mean()).max() > 0.5  # the refined tokens are not trivial
  with pytest.raises(UserError, match="do not divide"):  # a head count the width does not take
    load_llm4gen_cam(str(tmp_path / "projector.safetensors"), num_heads=5)


WORDS = ["pre", "a", "red", "blue", "green", "circle", "square", "on", "the", "left", "above"]


def _t5(path):
  """A tiny T5 encoder with a word-level tokenizer as T5's behaves: pad id 0, </s> appended."""
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                              unk_token="<unk>", model_max_length=512)
  fast.save_pretrained(path)
  torch.manual_seed(3)
  model = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=len(vocab), d_model=40, d_kv=10, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
      relative_attention_num_buckets=8, dropout_rate=0.0)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return fast, model


def test_llm4gen_config_samples_the_released_pipeline(tmp_path):
  """configs/llm4gen_sd15.py on a tiny SD 1.5-style folder, LLM4GEN-style U-Net, T5 and projector: the context is
  the reference CAM's (CLIP embeds from diffusers, T5 on "pre " + prompt, padded with 0, masked), and Pipeline on
  the config samples the images diffusers' pipeline gives from those prompt embeds and the CAM of the empty prompt."""
  import jax
  import jax.numpy as jnp
  from safetensors.torch import save_file
  from conftest import ROOT
  from lidit_jax import configs, state
  from lidit_jax.pipeline import Pipeline
  from test_pipeline import _reference, _randomise, sd15
  diffusers = pytest.importorskip("diffusers")
  root = tmp_path / "llm4gen"
  ref = sd15(root / "sd15")
  torch.manual_seed(5)
  ref.unet = _randomise(diffusers.UNet2DConditionModel(**ref.unet.config), 0.1)  # LLM4GEN's own U-Net
  ref.unet.save_pretrained(root / "unet")
  tokenizer, t5 = _t5(root / "t5")
  cam = released(clip_dim=24, llm_dim=40, num_heads=8)
  save_file({k: v.contiguous() for k, v in cam.state_dict().items()}, str(root / "projector.safetensors"))

  config = configs.load_config_file(f"{ROOT / 'configs' / 'llm4gen_sd15.py'}:{root}")
  config = configs.validate(configs.apply_overrides(config, {
      "model.dtype": "float32", "text.towers.clip.dtype": "float32", "text.towers.t5.dtype": "float32",
      "text.towers.t5.max_length": 16}), data=False)  # sampling: no training data
  prompts = ["a red circle", "blue square on the left"]

  def reference_context(texts):
    with torch.no_grad():
      clip = ref.encode_prompt(texts, "cpu", 1, False)[0]
      tok = tokenizer(["pre " + t for t in texts], padding="max_length", max_length=16, truncation=True,
                      return_tensors="pt")
      llm = t5(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
      return cam(clip, llm)

  want_ctx, empty_ctx = reference_context(prompts), reference_context(["", ""])
  assert want_ctx.shape == (2, 77 + 16, 24)
  s = state.setup(config, use_text_cache=False)
  params = s.init_state(jax.random.key(0)).params
  feats, valids, keep = state.text_inputs(s.towers, s.frozen["towers"], jax.tree.map(jnp.asarray, s.text_for(prompts)))
  ctx, valid = s.model.conditioner.apply({"params": params["conditioner"]}, feats, valids, keep)
  np.testing.assert_allclose(np.asarray(ctx), want_ctx.numpy(), atol=1e-4)
  assert bool(valid.all())  # released: no mask

  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  ours = Pipeline.from_pretrained(config)(prompts, num_steps=3, guidance=20.0, latents=latents)
  want = _reference(ref, None, latents, prompt_embeds=want_ctx, negative_prompt_embeds=empty_ctx,
                    num_inference_steps=3, guidance_scale=20.0)
  assert want.std() > 0.02
  np.testing.assert_allclose(ours, want, atol=2e-3)

  # the sample CLI on the config alone (no --workdir) draws the same image (seed 0's noise)
  import os
  import subprocess
  import sys
  from PIL import Image
  from lidit_jax import sample
  overrides = ["--config.model.dtype=float32", "--config.text.towers.clip.dtype=float32",
               "--config.text.towers.t5.dtype=float32", "--config.text.towers.t5.max_length=16"]
  r = subprocess.run([sys.executable, "-m", "lidit_jax.sample", "--config", f"configs/llm4gen_sd15.py:{root}",
                      *overrides, "--prompt", prompts[0], "--steps", "3", "--cfg", "20", "--out",
                      str(tmp_path / "cat.png")], capture_output=True, text=True, cwd=ROOT, timeout=600,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  seed0 = Pipeline.from_pretrained(config)(prompts[:1], num_steps=3, guidance=20.0, seed=0)
  grid = np.asarray(Image.open(tmp_path / "cat.png")).astype(int)
  got = grid[2 * 4:(2 + 16) * 4:4, 2 * 4:(2 + 16) * 4:4]  # the grid's one image, undone from its 4x upscale
  assert np.abs(got - sample.to_uint8(seed0)[0].astype(int)).max() <= 1


def test_cam_trains_samples_and_evaluates_on_the_demo(tmp_path):
  """configs/shapes.py:cam: train -> checkpoint -> sample -> evaluate; the CAM's parameters train (the context
  changes with them) and export under their names (the U-Net with the CAM: tests/test_contract_runs.py)."""
  import jax
  from conftest import ROOT
  from lidit_jax import configs, evaluate, state, train
  from lidit_jax.pipeline import Pipeline
  config = configs.validate(configs.load_config_file(f"{ROOT / 'configs' / 'shapes.py'}:tiny,cam"))
  train.train_and_evaluate(config, str(tmp_path))
  s, params, step = state.restore_for_inference(config, str(tmp_path))
  assert step == config.train.num_steps and "block_0" in params["conditioner"]["cam"]
  fresh = s.init_state(jax.random.key(config.seed)).params["conditioner"]["cam"]
  moved = jax.tree.map(lambda a, b: float(abs(a - b).max()), params["conditioner"]["cam"], fresh)
  assert max(jax.tree.leaves(moved)) > 1e-4
  pipe = Pipeline.from_pretrained(str(tmp_path))
  result = evaluate.evaluate(pipe, num_prompts=4, steps=2, batch_size=4)
  assert result["num_prompts"] == 4 and np.isfinite([result[f"{k}_accuracy"] for k in ("colour", "shape", "count")]).all()
  from safetensors.numpy import load_file
  from lidit_jax import export  # the trained CAM goes back to PyTorch layouts like any model
  exported = load_file(export.export_safetensors(str(tmp_path), str(tmp_path / "model.safetensors")))
  q = np.asarray(params["conditioner"]["cam"]["block_0"]["attn"]["query"]["kernel"])  # [D, H, K]
  np.testing.assert_array_equal(exported["conditioner.cam.block_0.attn.query.weight"], q.reshape(q.shape[0], -1).T)
