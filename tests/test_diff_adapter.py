"""The LLM Diff Adapter: per-block scores against a direct PyTorch computation on a tiny transformers Llama (both
readings of "the token alone"), the adapted U-Net equal to the plain one at init, configs/diff_adapter.py on tiny
SD 1.5 + Llama folders against diffusers at init and then trained (only the adapter side moves), and the demo
variants end to end (train -> preempted -> resumed on the same losses -> sample -> evaluate -> export)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import ROOT
from lidit_jax import configs, state, train


def torch_scores(model, ids, mask, alone: str):
  """[B, L, layers + 1, D]: the embeddings, then per block (its update with context) - (its update of the token
  alone), computed with transformers' own decoder layers under explicit 4-D masks."""
  with torch.no_grad():
    ids, mask = torch.tensor(np.asarray(ids)), torch.tensor(np.asarray(mask)).bool()
    x = model.embed_tokens(ids)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    rope = model.rotary_emb(x, positions)
    b, n = ids.shape
    low = torch.finfo(torch.float32).min
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None] & mask[:, None, :]
    full = torch.where(causal, 0.0, low)[:, None]
    diag = torch.where(torch.eye(n, dtype=torch.bool), 0.0, low)[None, None].expand(b, 1, n, n)
    out, y = [x], x
    for layer in model.layers:
      with_context = layer(x, attention_mask=full, position_embeddings=rope)
      start = x if alone == "diagonal" else y
      by_itself = layer(start, attention_mask=diag, position_embeddings=rope)
      out.append((with_context - x) - (by_itself - start))
      x, y = with_context, by_itself
  return torch.stack(out, dim=2).numpy()


@pytest.mark.parametrize("alone", ["diagonal", "trajectory"])
def test_scores_match_a_direct_torch_computation(tmp_path, alone):
  from test_llm_parity import batch, make_reference
  from lidit_jax.convert import load_hf_text_model
  ref = make_reference("llama3", tmp_path)  # GQA, llama3 rope scaling, random norms, peaked attention
  module, params = load_hf_text_model(str(tmp_path), dtype=jnp.float32)
  ids, mask = batch()
  got = np.moveaxis(np.asarray(module.clone(alone=alone).apply({"params": params}, ids, mask)), 0, 2)
  want = torch_scores(ref, ids, mask, alone)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)
  # the alone term matters: the readings differ from each other and from the plain update by far more than 1e-4
  other = torch_scores(ref, ids, mask, "trajectory" if alone == "diagonal" else "diagonal")
  assert np.abs(other[valid][:, 2:] - want[valid][:, 2:]).max() > 1e-2
  hidden = np.moveaxis(np.asarray(module.apply({"params": params}, ids, mask)), 0, 2)
  assert np.abs((hidden[:, :, 1] - hidden[:, :, 0])[valid] - got[valid][:, 1]).max() > 1e-2


@pytest.mark.parametrize("mix", ["per_layer", "global"])
def test_adapted_unet_is_the_plain_unet_at_init_and_mixes_after(mix):
  from lidit_jax.models import unet
  cfg = unet.UNetConfig(in_channels=4, out_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
                        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_heads=(4, 4), cross_attention_dim=24,
                        transformer_layers_per_block=(1, 1))
  rng = np.random.default_rng(0)
  x, t = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32), jnp.asarray([10.0, 500.0])
  ctx, code = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32), jnp.asarray(rng.normal(size=(2, 6, 40)), jnp.float32)
  valid = jnp.asarray([[True] * 6, [True] * 3 + [False] * 3])
  plain, adapted = unet.UNet2DConditionModel(cfg), unet.UNet2DConditionModel(cfg, second_mix=mix)
  params = adapted.init(jax.random.key(0), x, t, ctx, code_BMC=code, code_valid_BM=valid)["params"]
  params = jax.tree.map(lambda a: a + 0.05 * jnp.asarray(rng.normal(size=a.shape), a.dtype)
                        if a.shape != (2, 2) else a, params)  # off the zero inits; the mixes as initialised
  theirs = {k: v for k, v in params.items() if k != "attn_mix"}
  strip = lambda tree: {k: strip(v) for k, v in tree.items() if k not in ("attn2_new", "attn_mix")} if isinstance(
      tree, dict) else tree
  want = plain.apply({"params": strip(theirs)}, x, t, ctx)
  got = adapted.apply({"params": params}, x, t, ctx, code_BMC=code, code_valid_BM=valid)
  np.testing.assert_allclose(got, want, atol=1e-6)
  mixes = [k for k, _ in jax.tree_util.tree_flatten_with_path(params)[0] if "attn_mix" in jax.tree_util.keystr(k)]
  assert len(mixes) == (1 if mix == "global" else 4)  # per transformer: down 1, mid 1, up 2
  # a1 = 0.5, a2 = 1 (b = log 2 halves / doubles): the new attention's output now counts, and by the formula
  set_mix = lambda m: jax.tree_util.tree_map_with_path(
      lambda k, a: jnp.asarray(m) if "attn_mix" in jax.tree_util.keystr(k) else a, params)
  moved = adapted.apply({"params": set_mix([[1.0, np.log(0.5)], [0.5, np.log(2.0)]])}, x, t, ctx, code_BMC=code,
                        code_valid_BM=valid)
  same = adapted.apply({"params": set_mix([[0.5, 0.0], [1.0, 0.0]])}, x, t, ctx, code_BMC=code, code_valid_BM=valid)
  assert np.abs(np.asarray(moved - want)).max() > 1e-3
  np.testing.assert_allclose(moved, same, atol=1e-5)


def _llama(path, words):
  """A tiny Llama with a word-level tokenizer (<s> first, <pad> after), saved as a Hugging Face folder."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", model_max_length=512).save_pretrained(path)
  torch.manual_seed(4)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=len(vocab), hidden_size=40, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.3 + 1.0 if "norm" in name else p * 4.0)
  model.save_pretrained(path)
  return model.model


def test_diff_adapter_config_is_sd_at_init_and_trains_only_the_adapter(tmp_path):
  """configs/diff_adapter.py on a tiny SD 1.5-style folder + a tiny Llama: at init Pipeline.from_pretrained samples
  diffusers' images given prompt_embeds = phi(code) with the code summed from torch's scores (the adapted U-Net is
  SD's); three training steps move the adapter, the new attentions and the mixes, and nothing of the U-Net's own."""
  from lidit_jax.pipeline import Pipeline
  from test_llm4gen import WORDS
  from test_pipeline import _reference, sd15
  from test_sd_finetune import sd_config
  root = tmp_path / "diff"
  ref = sd15(root / "sd15")
  llama = _llama(root / "llm", WORDS)
  # no padding mask (as SD runs CLIP): diffusers' U-Net takes none; the masked reading is the first test's
  config = sd_config("diff_adapter", root, **{"text.towers.llm.max_length": 12, "text.towers.llm.mask_padding": False})
  prompts = ["a red circle", "blue square on the left"]
  s = state.setup(config, use_text_cache=False)
  params = s.init_state(jax.random.key(0)).params
  cond = params["conditioner"]

  def reference_embeds(texts):
    text = s.text_for(texts)["llm"]
    scores = torch_scores(llama, text["input_ids"], text["attention_mask"], "diagonal")
    code = scores[:, :, 0] + np.einsum("bltd,t->bld", scores[:, :, 1:], np.asarray(cond["block_scale"]))
    return code @ np.asarray(cond["phi"]["kernel"]) + np.asarray(cond["phi"]["bias"])

  embeds = reference_embeds(prompts)
  feats, valids, keep = state.text_inputs(s.towers, s.frozen["towers"], jax.tree.map(jnp.asarray, s.text_for(prompts)))
  out = s.model.conditioner.apply({"params": cond}, feats, valids, keep)
  np.testing.assert_allclose(np.asarray(out.context), embeds, atol=1e-4)
  # at init the adapted U-Net is the pipeline's: same images as diffusers given those prompt embeds
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  ours = Pipeline.from_pretrained(config)(prompts, num_steps=3, guidance=20.0, latents=latents)
  empty = reference_embeds(["", ""])
  want = _reference(ref, None, latents, prompt_embeds=torch.tensor(np.asarray(out.context)),
                    negative_prompt_embeds=torch.tensor(empty, dtype=torch.float32), num_inference_steps=3, guidance_scale=20.0)
  assert want.std() > 0.02
  np.testing.assert_allclose(ours, want, atol=2e-3)

  train.train_and_evaluate(config, str(tmp_path / "run"))
  _, trained, step = state.restore_for_inference(config, str(tmp_path / "run"))
  assert step == 3
  start = s.init_state(jax.random.key(config.seed)).params
  kinds = {"frozen": [], "new": []}
  for path, a in jax.tree_util.tree_flatten_with_path(trained)[0]:
    name = jax.tree_util.keystr(path)
    b = start
    for k in path:
      b = b[k.key]
    moved = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    if name.startswith("['denoiser']") and "attn2_new" not in name and "attn_mix" not in name:
      kinds["frozen"].append(moved)  # the original U-Net
    elif "attn_mix" in name or "attn2_new" in name or "phi" in name or "block_scale" in name:
      kinds["new"].append(moved)
  assert len(kinds["frozen"]) > 50 and max(kinds["frozen"]) == 0.0
  assert len(kinds["new"]) > 10 and min(kinds["new"]) > 0.0  # the new attentions too, once a2 left 0


def test_demo_diff_on_the_dit_trains_and_samples(tmp_path):
  """configs/shapes.py:tiny,diff: the DiT reads phi(code) (it has no second cross-attention)."""
  from lidit_jax.pipeline import Pipeline
  config = configs.validate(configs.load_config_file(f"{ROOT / 'configs' / 'shapes.py'}:tiny,diff"))
  train.train_and_evaluate(config, str(tmp_path))
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
  assert len(losses) == 3 and np.isfinite(losses).all()
  images = Pipeline.from_pretrained(str(tmp_path))(["a red circle", "a blue square"], num_steps=2, seed=1)
  assert images.shape == (2, 32, 32, 3) and images.std() > 0


def test_plan_reports_the_scores_and_encode_prompts_caches_them(tmp_path):
  """The scores tower's features (every block's, per prompt) are in the plan, with the tower's second pass in its
  FLOPs; the text cache holds exactly those bytes and refuses a config reading the tower's plain states."""
  from lidit_jax import model as model_lib, plan, text_cache
  from lidit_jax.data import pipeline
  config = configs.validate(configs.load_config_file(f"{ROOT / 'configs' / 'shapes.py'}:tiny,unet,diff"))
  tc = config.text.towers.llama_b
  p = plan.plan(config, 1)
  per_prompt = tc.max_length * (tc.num_layers + 1) * tc.hidden_size * 2  # bfloat16
  assert p["text_feature_bytes_per_prompt"] == {"llama_b": per_prompt}
  assert p["bytes_per_device"]["text_features"] == config.train.batch_size * per_prompt
  assert "text features per prompt: llama_b" in plan.format_plan(p)
  plain = configs.apply_overrides(config.copy_and_resolve_references(), {"text.towers.llama_b.output": "hidden",
                                                                        "text.towers.llama_b.all_layers": True})
  towers = model_lib.planned_towers(config)
  assert plan.model_flops_per_example(config, towers)["towers"] == 2 * plan.model_flops_per_example(plain, towers)["towers"]

  towers = model_lib.build_towers(config)
  params = model_lib.load_tower_params(config, towers)
  captions = ["a red circle", "a blue square", "a green star"]
  summary = text_cache.write(str(tmp_path), config, towers, params, captions, batch_size=2, progress=False)
  assert summary["bytes"] == len(captions) * (per_prompt + 2 * tc.max_length)
  got = text_cache.TextCache(str(tmp_path), config, towers)(["a blue square"])["llama_b"]["hidden"][0]
  ids = {k: jnp.asarray(v) for k, v in pipeline.tokenize(towers, ["a blue square"])["llama_b"].items()}
  want = towers[0].features(params["llama_b"], ids["input_ids"], ids["attention_mask"])[0]
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  with pytest.raises(ValueError, match="llama_b"):
    text_cache.TextCache(str(tmp_path), plain, model_lib.build_towers(plain))


def test_diff_adapter_config_refusals():
  base = f"{ROOT / 'configs' / 'shapes.py'}:tiny,unet,diff"
  cases = {"text.towers.llama_b.output": ("hidden", "text.towers.llama_b.output"),
           "text.use": ("llama_a,llama_b", "text.use"),
           "conditioner.diff.noise": ("sometimes", "conditioner.diff.noise"),
           "conditioner.diff.noise_init": (0.0, "conditioner.diff.noise_init"),
           "unet.second_attention": ("both", "unet.second_attention")}
  for key, (value, named) in cases.items():
    with pytest.raises(configs.ConfigError, match=named.replace(".", r"\.")):
      configs.validate(configs.apply_overrides(configs.load_config_file(base), {key: value}))


def test_the_code_sums_the_scores_and_draws_noise_only_when_asked():
  """code = embeddings + sum_t g_t score_t (+ sqrt(2 sum_t h_t) eps): noise in training (rng "noise"), at sampling
  only with noise="always" (rng "sample_noise"), never with "off"; start="zero" drops the embeddings."""
  from lidit_jax.conditioners import diff_adapter
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)  # 3 blocks
  valid = jnp.ones((2, 5), bool)
  args = ([f], [valid], [valid])
  g = np.asarray([0.5, -1.0, 2.0], np.float32)

  def code(rngs=None, **kw):
    m = diff_adapter.DiffAdapter(6, 0, noise_init=0.5, **kw)
    p = m.init(jax.random.key(0), *args)["params"]
    p["block_scale"] = jnp.asarray(g)
    return np.asarray(m.apply({"params": p}, *args, rngs=rngs).code)

  want = np.asarray(f[:, :, 0]) + np.einsum("bltd,t->bld", np.asarray(f[:, :, 1:]), g)
  np.testing.assert_allclose(code(), want, atol=1e-5)
  np.testing.assert_allclose(code(start="zero"), want - np.asarray(f[:, :, 0]), atol=1e-5)
  noisy = code({"noise": jax.random.key(1)}) - want
  assert abs(noisy.std() - np.sqrt(2 * 3 * 0.5)) < 0.3  # the blocks' variances add: 2 sum h = 3
  np.testing.assert_allclose(code({"sample_noise": jax.random.key(1)}), want, atol=1e-5)  # "train": not at sampling
  assert np.abs(code({"sample_noise": jax.random.key(1)}, noise="always") - want).max() > 0.5
  np.testing.assert_allclose(code({"noise": jax.random.key(1)}, noise="off"), want, atol=1e-5)
