"""Decoder LLM export (`hf_llm.to_hf`) as the inverse of conversion, checked through transformers.

Each family is built with its transformers base class (float32, every weight random), saved, loaded with our
converter and exported back: same keys, bit-equal arrays, a config that reads back as the same DecoderConfig,
and a transformers model built from the exported config and weights gives the original's hidden states.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open

from lidit_jax.convert import hf_llm, load_hf_text_model
from lidit_jax.models import llm

VOCAB = 67
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {  # name: (base model class, config overrides, model_type to_hf should choose)
    "gemma2": ("Gemma2Model", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                   attn_logit_softcapping=2.0), "gemma2"),
    "llama3": ("LlamaModel", dict(rope_theta=500.0, attention_bias=True, mlp_bias=True,
                                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=8)),
               "llama"),
    "mistral": ("MistralModel", dict(sliding_window=3, head_dim=12), "mistral"),
    "qwen2": ("Qwen2Model", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1), "qwen2"),
    "qwen3": ("Qwen3Model", dict(head_dim=16), "qwen3"),
}


def make_reference(family, path):
  cls_name, extra, _ = FAMILIES[family]
  cls = getattr(transformers, cls_name)
  torch.manual_seed(0)
  ref = cls(cls.config_class(**{**COMMON, **extra})).eval().float()
  with torch.no_grad():  # every tensor random (norms and biases too), so any swap or mis-reshape shows
    for p in ref.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  ref.save_pretrained(path)
  return ref


def hidden(model, ids, mask):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_inverts_conversion(family, tmp_path):
  ref = make_reference(family, tmp_path)
  module, params = load_hf_text_model(str(tmp_path), jnp.float32)
  config, state = hf_llm.to_hf(module.cfg, params)
  config = json.loads(json.dumps(config))  # what a config.json holds

  assert config["model_type"] == FAMILIES[family][2]
  assert config["architectures"] == [FAMILIES[family][0]]
  assert hf_llm.config_from_hf(config) == module.cfg
  # Base models have no LM head (nothing tied to leave out) and RoPE's inv_freq is a non-persistent buffer,
  # so the export names exactly what save_pretrained wrote and what the model's state_dict holds.
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    saved = {k: f.get_tensor(k) for k in f.keys()}
  assert set(state) == set(saved) == set(ref.state_dict())
  for key, value in state.items():
    assert value.dtype == np.float32 and value.flags.c_contiguous, key
    np.testing.assert_array_equal(value, saved[key], err_msg=key)

  fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
  rebuilt = getattr(transformers, config["architectures"][0])(
      transformers.AutoConfig.for_model(config["model_type"], **fields)).eval().float()
  rebuilt.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
  ids = np.random.default_rng(0).integers(3, VOCAB, size=(3, 10))
  mask = np.ones((3, 10), np.int64)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  np.testing.assert_allclose(hidden(rebuilt, ids, mask), hidden(ref, ids, mask), atol=1e-5, rtol=0)


def test_mistral_without_window_is_written_as_llama():
  cfg = llm.DecoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=48, head_dim=8)
  config, _ = hf_llm.to_hf(cfg, _zeros(cfg))
  assert config["model_type"] == "llama" and hf_llm.config_from_hf(config) == cfg


@pytest.mark.parametrize("change", [
    dict(embed_scale=True),  # Gemma's embedding scale without its norms: no such family
    dict(windows=(3, 0)),  # a window on some layers only: Mistral windows every layer
    dict(out_bias=True),  # an output bias without q/k/v biases
])
def test_unexportable_config_is_refused(change):
  cfg = llm.DecoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=48, head_dim=8, **change)
  with pytest.raises(ValueError, match="cannot be written as transformers model_type"):
    hf_llm.to_hf(cfg, _zeros(cfg))


def _zeros(cfg):
  """Parameters of the right shapes (the refusal comes before any is read)."""
  import jax
  module = hf_llm.make_module(cfg, jnp.float32)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), hf_llm.strip_boxes(hf_llm.abstract_params(module)))
