"""Decoder LLM towers against transformers (PyTorch, float32) on tiny random models, through the converter.

Each family is built with its transformers class, saved with `save_pretrained` (safetensors), loaded with
`load_hf_text_model` and compared hidden state by hidden state on a padded batch. 1e-4 catches a wrong
transpose, a wrong RoPE, a missing norm or a GQA mix-up (those give differences of order 0.1 to 1).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lidit_jax.convert import load_hf_text_model
from lidit_jax.convert import safetensors_io

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    # Llama 3.1 / 3.2: llama3 rope scaling, tied embeddings, GQA.
    "llama3": (transformers.LlamaConfig, dict(
        rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8))),
    # Llama 2 style: plain rope, MHA, biases on attention and MLP (attention_bias / mlp_bias switches).
    "llama2_bias": (transformers.LlamaConfig, dict(num_key_value_heads=6, attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4, head_dim=12)),
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                               attn_logit_softcapping=2.0, final_logit_softcapping=30.0)),
}
MODEL_CLASSES = {"llama3": "LlamaForCausalLM", "llama2_bias": "LlamaModel", "mistral": "MistralModel",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3Model", "gemma2": "Gemma2Model"}


def make_reference(family, path, max_shard_size=None):
  cfg_cls, extra = FAMILIES[family]
  torch.manual_seed(0)
  ref = getattr(transformers, MODEL_CLASSES[family])(cfg_cls(**{**COMMON, **extra})).eval().float()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" in name:  # random norm weights, so a norm mix-up (w vs 1 + w, pre vs post) shows
        p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family == "gemma2" else 1.0))
      if "q_proj.weight" in name or "k_proj.weight" in name:  # peaked attention, so soft-capping matters
        p.mul_(8.0)
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  ref.save_pretrained(path, **kw)
  return getattr(ref, "model", ref)


def batch(pad_side="right"):
  ids = np.random.default_rng(0).integers(3, VOCAB, size=(3, 10))
  mask = np.ones((3, 10), np.int64)
  if pad_side == "right":
    mask[1, 7:] = 0
    mask[2, 4:] = 0
  else:
    mask[1, :3] = 0
    mask[2, :6] = 0
  return ids, mask


def reference_hidden(ref, ids, mask, position_ids=None):
  with torch.no_grad():
    out = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
              position_ids=None if position_ids is None else torch.tensor(position_ids))
  return [h.numpy() for h in out.hidden_states]


def assert_match(got, want, mask, atol):
  assert got.shape[0] == len(want)
  for layer, w in enumerate(want):
    for b in range(mask.shape[0]):
      valid = mask[b].astype(bool)
      np.testing.assert_allclose(np.asarray(got[layer, b], np.float32)[valid], w[b][valid], atol=atol, rtol=0,
                                 err_msg=f"hidden state {layer}, row {b}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_states_match_transformers(family, tmp_path):
  ref = make_reference(family, tmp_path)
  module, params = load_hf_text_model(str(tmp_path), dtype=jnp.float32)
  ids, mask = batch()
  got = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert_match(got, reference_hidden(ref, ids, mask), mask, atol=1e-4)


def test_left_padding_matches_reference_with_valid_token_positions(tmp_path):
  """Our positions count valid tokens, so left padding gives the features of the unpadded prompt; the
  reference does the same when given those position ids."""
  ref = make_reference("qwen2", tmp_path)
  module, params = load_hf_text_model(str(tmp_path), dtype=jnp.float32)
  ids, mask = batch("left")
  got = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  assert_match(got, reference_hidden(ref, ids, mask, positions), mask, atol=1e-4)


def test_sharded_checkpoint_with_index(tmp_path):
  ref = make_reference("llama3", tmp_path, max_shard_size="40KB")
  shards = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
  assert len(shards) > 2 and os.path.exists(tmp_path / "model.safetensors.index.json")
  module, params = load_hf_text_model(str(tmp_path), dtype=jnp.float32)
  ids, mask = batch()
  got = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert_match(got, reference_hidden(ref, ids, mask), mask, atol=1e-4)


def test_bfloat16_within_documented_tolerance(tmp_path):
  """bf16 weights and activations (our frozen-tower setting) against the float32 reference: the
  documented tolerance is 0.1 relative to each layer's activation scale (bf16 keeps 8 mantissa bits)."""
  ref = make_reference("llama3", tmp_path)
  module, params = load_hf_text_model(str(tmp_path), dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  ids, mask = batch()
  got = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
  for layer, w in enumerate(reference_hidden(ref, ids, mask)):
    valid = mask.astype(bool)
    err = np.abs(got[layer][valid] - w[valid]).max() / np.abs(w[valid]).max()
    assert err < 0.1, f"layer {layer}: bf16 error {err:.3f} of the activation scale"


def test_output_layer_returns_that_hidden_state_only(tmp_path):
  make_reference("gemma2", tmp_path)
  module, params = load_hf_text_model(str(tmp_path), dtype=jnp.float32)
  ids, mask = (jnp.asarray(a) for a in batch())
  every = module.apply({"params": params}, ids, mask)
  for layer in (0, 1, -2, -1):
    one = module.clone(output_layer=layer).apply({"params": params}, ids, mask)
    np.testing.assert_allclose(one, every[layer], atol=1e-6)


def test_unsupported_rope_type_is_refused(tmp_path):
  make_reference("llama3", tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg.pop("rope_scaling", None)
  cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0,
                            "original_max_position_embeddings": 16}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    load_hf_text_model(str(tmp_path))


def test_missing_and_misshaped_tensors_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  make_reference("qwen3", tmp_path)
  f = tmp_path / "model.safetensors"
  tensors = load_file(str(f))
  del tensors["layers.1.mlp.up_proj.weight"]
  tensors["layers.0.self_attn.k_norm.weight"] = np.ones(5, np.float32)
  save_file(tensors, str(f), metadata={"format": "pt"})
  with pytest.raises(safetensors_io.ConversionError) as e:
    load_hf_text_model(str(tmp_path))
  assert "layers.1.mlp.up_proj.weight" in str(e.value)
  assert "layers.0.self_attn.k_norm.weight" in str(e.value)


def test_pickle_checkpoints_need_explicit_consent(tmp_path):
  ref = make_reference("llama2_bias", tmp_path)
  os.remove(tmp_path / "model.safetensors")
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match="allow_pickle"):
    load_hf_text_model(str(tmp_path))
  module, params = load_hf_text_model(str(tmp_path), allow_pickle=True)
  ids, mask = batch()
  got = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert_match(got, reference_hidden(ref, ids, mask), mask, atol=1e-4)


def test_unexpected_tensors_are_listed_and_lm_heads_ignored(tmp_path):
  from safetensors.numpy import load_file, save_file
  from lidit_jax.convert import hf_text
  make_reference("qwen2", tmp_path)  # a ForCausalLM save: keys under "model.", plus an untied lm_head
  f = tmp_path / "model.safetensors"
  tensors = load_file(str(f))
  assert "lm_head.weight" in tensors
  tensors["model.layers.0.mystery.weight"] = np.zeros(3, np.float32)
  save_file(tensors, str(f), metadata={"format": "pt"})
  *_, unused = hf_text.convert_hf_dir(str(tmp_path))
  assert unused == ["model.layers.0.mystery.weight"]
