"""T5 encoder and CLIP text towers, converted from Hugging Face saves, against transformers (PyTorch).

Each tiny random model is saved with `save_pretrained` (safetensors) and loaded through
`load_hf_text_model`, so the parity covers the config reading, the key prefixes and the transposes as
well as the math: every hidden state must agree on the valid tokens of a right-padded batch.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from lidit_jax.convert import hf_text
from lidit_jax.convert.hf_text import load_hf_text_model
from lidit_jax.convert.safetensors_io import ConversionError

VOCAB = 61
LENGTH = 10


def _perturb(model):
  """Random norm scales and biases too (they are born ones / zeros), so a swapped or dropped one shows."""
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _t5(kind):
  torch.manual_seed(0)
  common = dict(vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
                relative_attention_max_distance=12, layer_norm_epsilon=1e-6, dropout_rate=0.0)
  # 8 buckets over offsets up to 9: the log-spaced buckets are exercised, not only the exact ones.
  if kind == "t5-v1.0":  # a full seq2seq save: the decoder and LM head must be skipped
    cfg = transformers.T5Config(d_kv=8, d_ff=48, feed_forward_proj="relu", **common)
    return transformers.T5ForConditionalGeneration(cfg), lambda m: m.encoder
  if kind.startswith("t5-v1.1"):  # Flan-T5 style: gated GELU, num_heads * d_kv != d_model
    cfg = transformers.T5Config(d_kv=12, d_ff=40, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common)
    return transformers.T5EncoderModel(cfg), lambda m: m
  cfg = transformers.MT5Config(d_kv=12, d_ff=40, feed_forward_proj="gated-gelu", **common)
  return transformers.MT5EncoderModel(cfg), lambda m: m


def _clip(kind):
  torch.manual_seed(0)
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=16, attention_dropout=0.0, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
  if kind == "clip-full":  # CLIPModel: nested text_config (non-default activation), "text_model." keys
    cfg = transformers.CLIPConfig(text_config=dict(text, hidden_act="gelu"), projection_dim=8,
                                  vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=8, patch_size=4))
    return transformers.CLIPModel(cfg), lambda m: m.text_model
  return transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_act="quick_gelu", **text)), lambda m: m


def _batch():
  ids = np.random.default_rng(0).integers(2, VOCAB, size=(3, LENGTH))
  mask = np.ones((3, LENGTH), np.int64)
  mask[1, 6:] = 0  # right padding in the second row
  mask[2, :] = 0  # a fully padded third row: only checked for finiteness
  return ids, mask


def _rename_keys(path, rename):
  f = path / "model.safetensors"
  tensors = safetensors_numpy.load_file(str(f))
  safetensors_numpy.save_file({rename(k): v for k, v in tensors.items()}, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("kind", ["t5-v1.0", "t5-v1.1", "t5-v1.1-embed-key", "mt5", "clip-text", "clip-text-prefixed", "clip-full"])
def test_hidden_states_match_transformers(kind, tmp_path):
  model, tower_of = (_clip if kind.startswith("clip") else _t5)(kind)
  model = _perturb(model)
  model.save_pretrained(str(tmp_path))
  if kind == "clip-text-prefixed":  # older CLIPTextModel saves (Stable Diffusion's text_encoder)
    _rename_keys(tmp_path, lambda k: "text_model." + k)
  if kind == "t5-v1.1-embed-key":  # the encoder's own copy of the tied embedding, without "shared."
    _rename_keys(tmp_path, lambda k: "encoder.embed_tokens.weight" if k == "shared.weight" else k)

  ids, mask = _batch()
  with torch.no_grad():
    want = tower_of(model)(input_ids=torch.tensor(ids[:2]), attention_mask=torch.tensor(mask[:2]),
                           output_hidden_states=True).hidden_states
  module, params = load_hf_text_model(str(tmp_path), dtype=jnp.float32)
  got = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))

  assert got.shape[0] == len(want) == 4, (got.shape, len(want))
  assert np.isfinite(got).all(), "non-finite hidden states (the fully padded row?)"
  worst = 0.0
  for layer, w in enumerate(want):
    w = w.numpy()
    for b in range(2):
      valid = mask[b].astype(bool)
      np.testing.assert_allclose(got[layer, b][valid], w[b][valid], atol=1e-4, rtol=0,
                                 err_msg=f"{kind}: hidden state {layer}, row {b}")
      worst = max(worst, float(np.abs(got[layer, b][valid] - w[b][valid]).max()))
  print(f"{kind}: max abs difference {worst:.2e}")

  # Every tensor is either converted or deliberately skipped, and the config survives a JSON round trip.
  fam, cfg, _, _, unused = hf_text.convert_hf_dir(str(tmp_path))
  assert unused == []
  desc = json.loads(json.dumps(hf_text.describe(fam, cfg)))
  assert hf_text.from_description(desc, jnp.float32)[1] == cfg


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 12), (64, 300)])
def test_relative_buckets_match_transformers(num_buckets, max_distance):
  from transformers.models.t5.modeling_t5 import T5Attention
  from lidit_jax.models import t5
  lq, lk = 200, 520  # offsets well past max_distance on both sides
  rel = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]
  want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=num_buckets,
                                               max_distance=max_distance).numpy()
  np.testing.assert_array_equal(t5.relative_buckets(lq, lk, num_buckets, max_distance), want)


@pytest.mark.parametrize("config, key, value", [
    ({"model_type": "t5", "feed_forward_proj": "gated-silu"}, "feed_forward_proj", "gated-silu"),
    ({"model_type": "clip_text_model", "hidden_act": "relu"}, "hidden_act", "relu"),
    ({"model_type": "clip", "text_config": {"hidden_act": "gelu_new"}}, "hidden_act", "gelu_new"),
    ({"model_type": "clip_text_model", "position_embedding_type": "relative_key"}, "position_embedding_type",
     "relative_key"),
])
def test_unsupported_config_is_refused_by_name(config, key, value, tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError) as err:
    load_hf_text_model(str(tmp_path))
  assert key in str(err.value) and repr(value) in str(err.value), str(err.value)


def test_missing_tensor_is_reported_by_name(tmp_path):
  model, _ = _t5("t5-v1.1")
  model.save_pretrained(str(tmp_path))
  f = tmp_path / "model.safetensors"
  tensors = safetensors_numpy.load_file(str(f))
  gone = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
  del tensors[gone]
  safetensors_numpy.save_file(tensors, str(f), metadata={"format": "pt"})
  with pytest.raises(ConversionError, match=gone.replace(".", r"\.")):
    load_hf_text_model(str(tmp_path))
