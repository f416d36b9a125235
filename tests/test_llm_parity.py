"""Our Llama tower against transformers' LlamaModel (PyTorch, float32) on a tiny random model.

Catches a wrong transpose, a wrong RoPE convention, a missing norm or a GQA mix-up: every hidden state
of every layer must agree on the valid tokens of a padded batch.
"""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lidit_jax.models import llm


def test_llama_hidden_states_match_transformers():
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                    num_attention_heads=6, num_key_value_heads=2, rope_theta=500.0,
                                    rms_norm_eps=1e-5, max_position_embeddings=64, attention_bias=False)
  ref = transformers.LlamaModel(hf_cfg).eval().float()
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  d, h, kvh, k = 48, 6, 2, 8

  def stack(fmt, fn):
    return np.stack([fn(sd[fmt.format(i)]) for i in range(3)])

  params = {
      "embed_tokens": sd["embed_tokens.weight"],
      "norm": {"scale": sd["norm.weight"]},
      "layers": {
          "input_norm": {"scale": stack("layers.{}.input_layernorm.weight", lambda w: w)},
          "post_attn_norm": {"scale": stack("layers.{}.post_attention_layernorm.weight", lambda w: w)},
          "attn": {
              "query": {"kernel": stack("layers.{}.self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, k))},
              "key": {"kernel": stack("layers.{}.self_attn.k_proj.weight", lambda w: w.T.reshape(d, kvh, k))},
              "value": {"kernel": stack("layers.{}.self_attn.v_proj.weight", lambda w: w.T.reshape(d, kvh, k))},
              "out": {"kernel": stack("layers.{}.self_attn.o_proj.weight", lambda w: w.T.reshape(h, k, d))},
          },
          "mlp": {name: {"kernel": stack(f"layers.{{}}.mlp.{name}.weight", lambda w: w.T)}
                  for name in ("gate_proj", "up_proj", "down_proj")},
      },
  }
  ours = llm.LlamaTower(llm.LlamaConfig(97, 48, 3, 6, 2, 80, rope_theta=500.0, norm_eps=1e-5))

  ids = np.random.default_rng(0).integers(0, 97, size=(2, 9))
  mask = np.ones((2, 9), np.int64)
  mask[1, 6:] = 0  # right padding in the second row
  with torch.no_grad():
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True).hidden_states
  got = np.asarray(ours.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
  assert got.shape[0] == len(want) == 4
  for layer, w in enumerate(want):
    w = w.numpy()
    for b in range(2):
      valid = mask[b].astype(bool)
      np.testing.assert_allclose(got[layer, b][valid], w[b][valid], atol=1e-4, rtol=0,
                                 err_msg=f"hidden state {layer}, row {b}")
