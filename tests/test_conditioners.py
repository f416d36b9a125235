"""Conditioners behind their contract, and towers that give every layer (`text.towers.NAME.all_layers`)."""
import jax.numpy as jnp
import numpy as np
import pytest

from lidit_jax import configs, model as model_lib, sample, state as state_lib, train
from lidit_jax.pipeline import Pipeline, Workdir
from lidit_jax.data import pipeline

from conftest import tiny_config

EVERY_LAYER = {"conditioner.kind": "tokens", "text.towers.llama_a.all_layers": True}


@pytest.mark.parametrize("key, value", [("final_norm", True), ("output", "pooled")])
def test_a_tower_refuses_a_reading_its_text_family_does_not_give(key, value):
  """A reading is its text family's (hf_llm / hf_t5 / hf_clip READINGS): a Llama tower asked for CLIP's final norm
  or pooled output is refused by name, with the family that gives it."""
  with pytest.raises(ValueError, match=rf"text.towers.llama_a.{key}=.*hf_llm tower.*Fix: use a tower of hf_clip"):
    model_lib.build_towers(tiny_config(**{f"text.towers.llama_a.{key}": value}))


def test_every_layer_is_each_hidden_state_token_major():
  """all_layers: [B, L, num_layers + 1, D], whose `layer` slice is what the one-layer tower gives."""
  one, every = (model_lib.build_towers(tiny_config(**over))[0] for over in ({}, EVERY_LAYER))
  params = model_lib.load_tower_params(tiny_config(), [one])[one.name]
  tok = pipeline.tokenize([one], ["a red circle to the left of a blue square"])[one.name]
  ids, mask = jnp.asarray(tok["input_ids"]), jnp.asarray(tok["attention_mask"])
  f1, fa = one.features(params, ids, mask), every.features(params, ids, mask)
  n = every.num_layers
  assert fa.shape == (1, one.encoder.max_length, n + 1, one.hidden_size) == (1, *every.feature_shape)
  np.testing.assert_array_equal(np.asarray(fa[:, :, one.layer % (n + 1)]), np.asarray(f1))
  assert float(jnp.abs(fa[:, :, 0] - fa[:, :, n]).max()) > 1e-2  # the layers differ


def test_offline_text_cache_holds_every_layer_and_its_vocabulary(tmp_path):
  from lidit_jax import text_cache
  config = tiny_config(**EVERY_LAYER)
  towers = model_lib.build_towers(config)
  params = model_lib.load_tower_params(config, towers)
  captions = ["a red circle", "a blue square above a green star"]
  text_cache.write(str(tmp_path), config, towers, params, captions, batch_size=2, progress=False)
  got = text_cache.TextCache(str(tmp_path), config, towers)(captions[::-1])
  tok = pipeline.tokenize(towers, captions[::-1])
  for t in towers:
    want = t.features(params[t.name], jnp.asarray(tok[t.name]["input_ids"]), jnp.asarray(tok[t.name]["attention_mask"]))
    assert got[t.name]["hidden"].shape == (2, *t.feature_shape)
    np.testing.assert_allclose(got[t.name]["hidden"].astype(np.float32), np.asarray(want, np.float32), rtol=1e-2)
  assert got["llama_a"]["hidden"].ndim == 4 and got["llama_b"]["hidden"].ndim == 3
  other_words = tiny_config(**EVERY_LAYER, **{"text.words": ("red", "circle")})
  with pytest.raises(ValueError, match="text.words"):  # another word tokenizer: other token ids
    text_cache.TextCache(str(tmp_path), other_words, model_lib.build_towers(other_words))


def test_refiners_refuse_every_layer():
  with pytest.raises(configs.ConfigError, match="text.towers.llama_a.all_layers=True.*conditioner.kind=tokens"):
    tiny_config(**{"text.towers.llama_a.all_layers": True})


def test_tokens_on_every_layer_train_from_the_host_cache_and_sample(tmp_path):
  """A tower giving every layer goes through the whole path: the host feature cache, the jitted step (the
  layer mix learns), a checkpoint, and sampling with the towers run again."""
  config = tiny_config(**EVERY_LAYER, **{"text.cache": "memory", "train.num_steps": 5, "train.checkpoint_every": 5,
                                         "train.sample_every": 100})
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  s, params, step = state_lib.restore_for_inference(config, workdir)
  mix = np.asarray(params["conditioner"]["layer_mix_0"])
  # The mix sits behind zero-initialised output layers: it moves from the fourth step on.
  assert step == 5 and mix.shape == (s.towers[0].num_layers + 1,) and np.ptp(mix) > 0  # moved off uniform
  assert "layer_mix_1" not in params["conditioner"]  # llama_b gives one layer
  images = sample.generate_images(Pipeline(Workdir.of(s, params)), ["a purple star"], steps=2)
  assert images.shape == (1, 1, 32, 32, 3) and np.isfinite(images).all()
