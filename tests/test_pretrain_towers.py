"""Towers that know the demo's language (issue 17), tiny versions: the caption corpus, T5's span corruption, and the
one command that pretrains two Llama LMs, an instruction-tuned variant and a T5 encoder with transformers' classes,
whose held-out losses fall and whose saved folders our converters read to transformers' features."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lidit_jax.experiments import corpus, pretrain_towers


def test_corpus_phrases_the_demo_scenes_many_ways_within_its_vocabulary():
  train, held = corpus.texts(400, "train"), corpus.texts(100, "heldout")
  words = set(corpus.vocabulary())
  assert {w for t in train + held for w in t.split()} <= words
  assert corpus.texts(5, "train", seed=3) == corpus.texts(5, "train", seed=3) != corpus.texts(5, "train", seed=4)
  joined = " ".join(train)
  for phrase in ("on top of", "beneath", "left of", "there is", "you can see", " , "):
    assert phrase in joined, phrase
  assert sum(any(d in t for d in corpus.DISTRACTORS) for t in train) > 100
  assert sum("." not in t for t in train) > 40  # the demo's own captions (no sentence marks) are among them
  assert not set(held) & set(train)
  lengths = {len(s.objects) for s in corpus.scenes(300, "train", np.random.default_rng(0))}
  assert lengths == set(range(1, 7))  # the positional study's inventories of up to six objects are read too
  assert {len(s.objects) for s in corpus.scenes(50, "heldout", np.random.default_rng(0))} == {2, 3}


def test_span_corruption_hides_spans_behind_sentinels_and_the_target_restores_them():
  rng = np.random.default_rng(0)
  ids = list(range(10, 50)) + [1]
  first = 100
  inputs, target = pretrain_towers.span_corrupt(ids, rng, first, eos=1)
  assert inputs[-1] == target[-1] == 1 and target[0] == first
  restored, spans, cur = [], {}, None
  for t in target[:-1]:
    if t >= first:
      cur = t
      spans[cur] = []
    else:
      spans[cur].append(t)
  for t in inputs[:-1]:
    restored += spans[t] if t >= first else [t]
  assert restored == ids[:-1]
  hidden = sum(len(v) for v in spans.values())
  assert 0.1 <= hidden / 40 <= 0.4 and len(spans) >= 1


def test_pretrain_command_makes_four_towers_our_converters_read(tmp_path):
  import jax.numpy as jnp
  from lidit_jax import prompt
  from lidit_jax.convert import load_hf_text_model
  assert pretrain_towers.main(["--out", str(tmp_path), "--quick"]) == 0
  report = json.loads((tmp_path / "report.json").read_text())
  for name in ("lm", "lm_b", "lm_instruct", "t5"):
    r = report[name]
    assert r["heldout_loss"] < r["heldout_loss_before"], (name, r)  # it learned something that generalises
    module, params = load_hf_text_model(str(tmp_path / name), dtype=jnp.float32)
    tok = prompt.load_tokenizer(str(tmp_path / name))
    enc = tok(["a red circle is above a blue square .", "there is a green triangle"], padding=True,
              return_tensors="np")
    got = module.apply({"params": params}, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]))
    got = np.asarray(got[0][-1] if isinstance(got, tuple) else got[-1])
    cls = transformers.T5EncoderModel if name == "t5" else transformers.LlamaModel
    ref = cls.from_pretrained(str(tmp_path / name)).eval()
    with torch.no_grad():
      want = ref(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]))
    valid = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], want.last_hidden_state.numpy()[valid], atol=1e-4)
  assert prompt.load_tokenizer(str(tmp_path / "lm_instruct")).chat_template  # the instruction: the system turn
  assert not prompt.load_tokenizer(str(tmp_path / "lm_b")).chat_template  # base LMs read plain text
