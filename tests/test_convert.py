"""The conversion CLI, converted checkpoints, the tiny demo LLMs, and LI-DiT on converted towers."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from lidit_jax import configs
from lidit_jax.convert import load_hf_text_model, tiny_models
from lidit_jax.convert import __main__ as convert_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = tmp_path_factory.mktemp("tiny")
  assert tiny_models.main([str(out), "--convert"]) == 0
  return out


def test_tiny_models_load_in_transformers_with_parity(tiny):
  """The numpy-written checkpoints are genuine Hugging Face models: transformers loads them and agrees."""
  torch = pytest.importorskip("torch")
  import transformers
  for arch in tiny_models.ARCHS:
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tiny / arch), local_files_only=True).eval()
    module, params = load_hf_text_model(str(tiny / arch))
    ids = np.random.default_rng(1).integers(8, ref.config.vocab_size, size=(2, 7))
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
      want = ref.model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True).hidden_states
    got = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    for layer, w in enumerate(want):
      np.testing.assert_allclose(np.asarray(got[layer])[mask == 1], w.numpy()[mask == 1], atol=1e-4, rtol=0)


def test_converted_directory_equals_the_hf_directory(tiny):
  for arch in tiny_models.ARCHS:
    _, from_hf = load_hf_text_model(str(tiny / arch))
    module, converted = load_hf_text_model(str(tiny / f"{arch}-orbax"))
    jax.tree.map(np.testing.assert_array_equal, from_hf, converted)
    desc = json.loads((tiny / f"{arch}-orbax" / "lidit_converted.json").read_text())
    assert desc["family"] == "hf_llm" and desc["dtype"] == "float32"
    assert (tiny / f"{arch}-orbax" / "tokenizer.json").exists()  # the tokenizer travels with the weights


def test_converted_bf16_restores_in_the_requested_dtype(tiny, tmp_path):
  assert convert_cli.main(["hf-text", str(tiny / "llama"), str(tmp_path / "bf16")]) == 0  # default bfloat16
  _, p16 = load_hf_text_model(str(tmp_path / "bf16"), dtype=jnp.bfloat16)
  _, p32 = load_hf_text_model(str(tmp_path / "bf16"), dtype=jnp.float32)
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(p32)} == {jnp.dtype(jnp.float32)}
  _, ref = load_hf_text_model(str(tiny / "llama"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16))
                                                          .astype(np.float32)), p32, ref)


def test_cli_refuses_bad_input_with_a_clear_message(tiny, tmp_path):
  cmd = [sys.executable, "-m", "lidit_jax.convert", "hf-text"]
  r = subprocess.run(cmd + [str(tmp_path / "nope"), str(tmp_path / "out")], capture_output=True, text=True,
                     cwd=ROOT)
  assert r.returncode == 2 and "config.json" in r.stderr, r.stderr
  r = subprocess.run(cmd + [str(tiny / "llama"), str(tiny / "qwen2")], capture_output=True, text=True,
                     cwd=ROOT)  # a Hugging Face folder as OUT: not a previous conversion, refused
  assert r.returncode == 2 and "is not a converted text model" in r.stderr, r.stderr
  r = subprocess.run([sys.executable, "-m", "lidit_jax.convert", "hf-text", "--help"], capture_output=True,
                     text=True, cwd=ROOT)
  assert r.returncode == 0 and "--allow-pickle" in r.stdout


SHARDED_LOAD = """
import json, sys, jax, numpy as np
from jax.sharding import Mesh
from lidit_jax import configs
from lidit_jax.convert import load_hf_text_model
mesh = Mesh(np.asarray(jax.devices()).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
for path in sys.argv[1:]:
  _, p = load_hf_text_model(path, mesh=mesh, rules=configs.DEFAULT_RULES)
  _, ref = load_hf_text_model(path)
  e = p["embed_tokens"]
  up = p["layers"]["mlp"]["up_proj"]["kernel"]
  print(json.dumps({"embed": [e.shape, e.addressable_shards[0].data.shape], "devices": len(e.sharding.device_set),
                    "up_proj": [up.shape, up.addressable_shards[0].data.shape]}))
  jax.tree.map(np.testing.assert_array_equal, p, ref)
"""


def test_sharded_placement_on_a_mesh(tiny):
  """Each tensor goes straight into its per-device shards (embed over fsdp=4, mlp over tensor=2), from a
  Hugging Face directory and from a converted one, with the same values as an unsharded load."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(tiny / "llama"), str(tiny / "llama-orbax")],
                     capture_output=True, text=True, env=env, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 2
  for line in lines:  # embed width 32 split over fsdp=4; up_proj [3, 64, 32] ([out, in]): mlp over tensor, embed over fsdp
    got = json.loads(line)
    (vocab, width), shard = got["embed"]
    # vocab goes over tensor=2 when it divides, else tensor joins fsdp on the width (sharding.fit_spec)
    assert width == 32 and shard == ([vocab // 2, 8] if vocab % 2 == 0 else [vocab, 4]) and got["devices"] == 8
    assert got["up_proj"] == [[3, 64, 32], [3, 32, 8]]


def test_shapes_demo_on_two_converted_llms(tiny, tmp_path, monkeypatch):
  """configs/shapes.py:tiny,hf: a Llama-3 and a Qwen2 tower (frozen, bf16, outside the optimizer)."""
  from lidit_jax import state as state_lib, train
  monkeypatch.chdir(tmp_path)
  os.symlink(tiny, tmp_path / "checkpoints_tiny")
  c = configs.load_config_file(str(ROOT / "configs" / "shapes.py") + ":tiny,hf")
  for name in ("llama", "qwen2"):
    c.text.towers[name].init = str(tiny / f"{name}-orbax")
  c.text.towers.qwen2.init = str(tiny / "qwen2")  # a Hugging Face directory works as well
  configs.validate(c)
  s = state_lib.setup(c)
  assert [t.name for t in s.towers] == ["llama", "qwen2"]
  assert {x.dtype for x in jax.tree.leaves(s.frozen["towers"])} == {jnp.dtype(jnp.bfloat16)}
  state = s.init_state(jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  assert not any("embed_tokens" in jax.tree_util.keystr(p) for p, _ in flat)  # towers are not optimized
  train.train_and_evaluate(c, str(tmp_path / "run"))
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all()


def test_t5_and_clip_towers_feed_lidit(tmp_path):
  """Encoder towers plug in like decoder LLMs: a T5 encoder and a CLIP text model (tiny, random, saved by
  transformers) as the two towers of the tiny demo, trained for a few steps."""
  torch = pytest.importorskip("torch")
  import transformers
  from lidit_jax import prompt, train
  from lidit_jax.data import shapes
  vocab = len(prompt.build_word_tokenizer(shapes.VOCABULARY))
  torch.manual_seed(0)
  transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      feed_forward_proj="gated-gelu")).save_pretrained(tmp_path / "t5")
  transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0)).save_pretrained(tmp_path / "clip")
  c = configs.load_config_file(str(ROOT / "configs" / "shapes.py") + ":tiny")
  c.text.use = "t5,clip"
  c.text.towers = {"t5": configs.tower(init=str(tmp_path / "t5"), tokenizer="words", layer=-1, max_length=56),
                   "clip": configs.tower(init=str(tmp_path / "clip"), tokenizer="words", layer=-2, max_length=56)}
  configs.validate(c)
  metrics = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert np.isfinite(metrics["loss"])
