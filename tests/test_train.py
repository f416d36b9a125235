"""End to end on the tiny shapes config: train -> checkpoint/resume -> sample -> evaluate, and the CLIs."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lidit_jax import evaluate, sample, state as state_lib, train
from lidit_jax.pipeline import Pipeline, Workdir
from lidit_jax.data import pipeline, shapes

from conftest import ROOT, tiny_config

TINY = str(ROOT / "configs/shapes.py:tiny")


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(**{"train.checkpoint_every": 2})
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_training_writes_metrics_checkpoints_and_samples(trained):
  config, workdir = trained
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
  assert {"grad_norm", "param_norm", "lr", "steps_per_sec", "tflops_per_device", "mfu"} <= set(rows[0])
  assert 0 < rows[-1]["mfu"] < 1  # model FLOPs against this CPU's measured matmul peak (plan.CHIP_PEAK_TFLOPS)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "6"
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000006.png"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))


def test_sample_and_evaluate_from_the_checkpoint(trained):
  config, workdir = trained
  s, params, step = state_lib.restore_for_inference(config, workdir)
  assert step == 6
  pipe = Pipeline(Workdir.of(s, params))
  imgs = sample.generate_images(pipe, ["a red circle", "a blue square above a green triangle"], 2,
                                steps=2, cfg_scale=2.0)
  assert imgs.shape == (2, 2, 32, 32, 3) and imgs.dtype == np.uint8
  again = sample.generate_images(pipe, ["a red circle"], 1, steps=2, cfg_scale=2.0)
  np.testing.assert_array_equal(again[0, 0], imgs[0, 0])  # noise depends on (seed, prompt, image) only
  same = sample.generate_images(pipe, ["a red circle"] * 2, 1, steps=2, cfg_scale=2.0, noise_ids=[5, 5])
  np.testing.assert_array_equal(same[0], same[1])  # a shared noise id is shared noise (the relation probe's)
  assert np.abs(same[0].astype(int) - imgs[0].astype(int)).max() > 0
  result = evaluate.evaluate(pipe, num_prompts=4, steps=2, cfg_scale=2.0, batch_size=4, num_probe_pairs=2)
  assert result["relation_probe_pairs"] == 2 and set(result["relation_offsets"]) == set(shapes.RELATIONS)
  # A whole prompt is right only when each of its parts is; an object only when its colour and shape are.
  parts = ("object_accuracy", "relation_accuracy", "count_accuracy")
  assert all(result["prompt_accuracy"] <= result[k] for k in parts), result
  assert result["object_accuracy"] <= min(result["colour_accuracy"], result["shape_accuracy"]), result
  for k in ("prompt_accuracy", "count_accuracy", "object_accuracy_first_phrase", "object_accuracy_last_phrase"):
    assert result[k] * 4 == round(result[k] * 4), (k, result[k])  # one value per prompt, 4 prompts
  assert result["num_prompts"] == 4
  # sample.shift overrides the training shift (3 in the demo) for the sampling steps only.
  assert s.config.flow.shift != 1.0
  s.config.sample.shift = 1.0
  try:
    unshifted = sample.generate_images(Pipeline(Workdir.of(s, params)), ["a red circle"], 1, steps=2, cfg_scale=2.0)
  finally:
    s.config.sample.shift = 0.0
  assert np.abs(unshifted[0].astype(int) - again[0].astype(int)).max() > 0


def test_pipeline_from_the_workdir(trained):
  """Pipeline.from_pretrained(workdir) reads the run's own config.json and gives the images the model, guidance,
  the objective's sampler and the decoder give by hand."""
  from conftest import images_by_hand
  from lidit_jax import model as model_lib
  config, workdir = trained
  pipe = Pipeline.from_pretrained(workdir)
  prompts = ["a red circle", "a blue square above a green triangle", "a green triangle"]
  noise = np.random.default_rng(0).standard_normal((3, *model_lib.latent_shape(config))).astype(np.float32)
  got = pipe(prompts, num_steps=2, guidance=2.0, latents=noise, batch_size=2)
  s, params, _ = state_lib.restore_for_inference(config, workdir)
  want = images_by_hand(s, params, prompts, noise, 2, 2.0, config.sample.sampler)
  assert got.shape == (3, 32, 32, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)
  one, two = (pipe(prompts[:1], num_steps=2, guidance=2.0, seed=k) for k in (1, 2))  # noise from the seed
  assert np.abs(one - two).max() > 1e-3
  with pytest.raises(ValueError, match="negative_prompt"):
    pipe(prompts, negative_prompt="blue")
  with pytest.raises(ValueError, match="trained at 32 x 32"):
    pipe(prompts, height=64, width=64)


def test_init_from_a_run_with_fresh_and_frozen_groups(trained, tmp_path):
  """model.init loads another run's EMA weights but those model.init_skip names (left at their fresh init), and
  train.freeze keeps groups fixed: the shape of fine-tuning a backbone under a new module."""
  from lidit_jax import checkpoint, configs
  _, source = trained
  _, source_ema, _ = state_lib.restore_for_inference(tiny_config(), source)
  fresh = state_lib.setup(tiny_config()).init_state(jax.random.key(0))
  over = {"model.init": source, "model.init_skip": ("token_refiner_1",), "train.freeze": ("denoiser/",),
          "train.num_steps": 3, "train.checkpoint_every": 3, "train.sample_every": 100}
  config = tiny_config(**over)
  start = state_lib.setup(config).init_state(jax.random.key(0))
  flat = lambda tree: {checkpoint.param_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  got, src, new = flat(start.params), flat(source_ema), flat(fresh.params)
  skipped = [k for k in got if k.startswith("conditioner/token_refiner_1/")]
  assert skipped and len(skipped) < len(got)
  for k in got:  # loaded from the run, or (skipped) the fresh initialisation; the two differ everywhere tested
    np.testing.assert_array_equal(got[k], new[k] if k in skipped else src[k], err_msg=k)
  assert any(np.abs(src[k] - new[k]).max() > 0 for k in skipped)
  train.train_and_evaluate(config, str(tmp_path / "tuned"))
  ckpt = checkpoint.require(str(tmp_path / "tuned"))
  tuned, _ = ckpt.restore(state_lib.setup(config).abstract_state)
  ckpt.close()
  after = flat(tuned.params)  # the trained weights (their EMA would move a frozen one by rounding)
  frozen = [k for k in got if k.startswith("denoiser/")]
  assert frozen and all(np.array_equal(after[k], got[k]) for k in frozen)  # frozen: not one value moved
  assert any(np.abs(after[k] - got[k]).max() > 0 for k in got if k not in frozen)  # the rest trained
  with pytest.raises(configs.ConfigError, match="model.init_skip pattern 'token_refiner_9' matches no parameter"):
    state_lib.setup(tiny_config(**{**over, "model.init_skip": ("token_refiner_9",)}))
  with pytest.raises(configs.ConfigError, match="train.freeze=.*not a regular expression"):
    tiny_config(**{**over, "train.freeze": ("denoiser/[",)})
  deeper = tiny_config(**{**over, "model.init_skip": (), "model.refiner.depth": 2})
  with pytest.raises(checkpoint.UserError, match="has no parameter conditioner/token_refiner_0/.*model.init_skip"):
    state_lib.setup(deeper).init_state(jax.random.key(0))
  with pytest.raises(checkpoint.UserError, match="model.init=.*does not exist"):
    state_lib.setup(tiny_config(**{**over, "model.init": str(tmp_path / "typo")})).init_state(jax.random.key(0))


def test_frozen_groups_get_no_gradient():
  """train.freeze: the same loss, but the logged gradient norm is that of the trained groups alone (the frozen
  ones enter the loss behind stop_gradient, so no gradient is computed for them)."""
  out = {}
  for freeze in ((), ("denoiser/",)):
    s = state_lib.setup(tiny_config(**{"train.freeze": freeze}))
    state = s.init_state(jax.random.key(0))
    # Zero-initialised output layers pass no gradient upstream at init: move every weight off its init.
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    state = state.replace(params=jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                                            for p, k in zip(leaves, keys)]))
    batch = next(pipeline.make_batches(s.config, s.text_for))
    _, m = train.make_train_step(s)(state, s.frozen, train.device_batch(batch, s.mesh), jax.random.key(1))
    out[freeze] = {k: float(m[k]) for k in ("loss", "grad_norm")}
  whole, part = out[()], out[("denoiser/",)]
  np.testing.assert_allclose(part["loss"], whole["loss"], rtol=1e-6)
  assert 0 < part["grad_norm"] < 0.99 * whole["grad_norm"], out


def test_nonfinite_loss_stops_naming_the_step(tmp_path, monkeypatch):
  from lidit_jax.objectives import flow
  real = flow.loss_terms
  monkeypatch.setattr(flow, "loss_terms", lambda *a, **k: (real(*a, **k)[0] * jnp.nan, None))
  with pytest.raises(FloatingPointError, match="non-finite loss nan .* at step 1"):
    train.train_and_evaluate(tiny_config(), str(tmp_path))


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_sample_and_evaluate_cli(trained, tmp_path):
  _, workdir = trained
  out = tmp_path / "one.png"
  r = run_cli("lidit_jax.sample", "--config", TINY, "--workdir", workdir, "--prompt",
              "a red circle to the left of a blue square", "--out", str(out), "--num_images", "3", "--steps", "2")
  assert r.returncode == 0, r.stderr[-2000:]
  assert Image.open(out).size[0] > 3 * 32  # a grid of 3
  r = run_cli("lidit_jax.evaluate", "--config", TINY, "--workdir", workdir, "--out", str(tmp_path / "e.json"))
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads((tmp_path / "e.json").read_text())
  assert "relation_accuracy" in result and result["checkpoint_step"] == 6
  assert (tmp_path / "eval_grid.png").exists()


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
  r = run_cli("lidit_jax.sample", "--config", TINY, "--workdir", str(tmp_path / "empty"), "--prompt", "a red circle")
  assert r.returncode != 0
  assert "no checkpoint in" in r.stderr and "train first" in r.stderr


def test_demo_entry_point_runs_end_to_end(tmp_path):
  """`python -m lidit_jax` is the README's main command; here on the tiny config."""
  r = run_cli("lidit_jax", "--config", TINY, "--workdir", str(tmp_path))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "relation_accuracy=" in r.stdout
  assert json.loads((tmp_path / "eval.json").read_text())["checkpoint_step"] == 6
  assert (tmp_path / "demo_samples.png").exists()


def test_training_from_a_text_cache_matches_online_towers(trained, tmp_path):
  """encode_prompts caches the towers' features; training on them never loads the LLMs and follows
  the same loss curve as running the towers in the step."""
  config, reference = trained
  cache = str(tmp_path / "cache")
  r = subprocess.run([sys.executable, "-m", "lidit_jax.encode_prompts", "--config", TINY, "--out", cache,
                      "--config.train.checkpoint_every=2"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert 0 < summary["captions"] <= 6 * 4 + len(config.sample.prompts)
  cached = tiny_config(**{"train.checkpoint_every": 2, "text.cache": cache})
  s = state_lib.setup(cached)
  assert s.frozen["towers"] == {}  # the LLMs are not even loaded
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(cached, workdir)
  got, want = read_metrics(workdir), read_metrics(reference)
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-4)
  # Sampling new prompts from a cache-trained config loads the towers again.
  s, params, step = state_lib.restore_for_inference(cached, workdir)
  assert step == 6 and set(s.frozen["towers"]) == {"llama_a", "llama_b"}
  assert sample.generate_images(Pipeline(Workdir.of(s, params)), ["a purple star"], steps=2).shape == (1, 1, 32, 32, 3)


def test_memory_text_cache_trains_like_online_towers_and_encodes_each_caption_once(trained, tmp_path):
  config, reference = trained
  cached = tiny_config(**{"train.checkpoint_every": 2, "text.cache": "memory"})
  s = state_lib.setup(cached)
  assert s.frozen["towers"] == {}  # the step never sees the towers: features come from the host
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(cached, workdir)
  got, want = read_metrics(workdir), read_metrics(reference)
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-4)
  cache = s.text_for
  first = cache(["a red circle", "a blue square", "a red circle"])
  misses = cache.misses
  again = cache(["a blue square", "a red circle"])
  assert cache.misses == misses  # seen captions are not encoded again
  np.testing.assert_array_equal(again["llama_b"]["hidden"][1], first["llama_b"]["hidden"][0])
  direct = s.towers[1].features(cache.params["llama_b"], *(jnp.asarray(pipeline.tokenize(s.towers, ["a blue square"])
                                                          ["llama_b"][k]) for k in ("input_ids", "attention_mask")))
  np.testing.assert_allclose(np.asarray(again["llama_b"]["hidden"][0], np.float32),
                             np.asarray(direct[0], np.float32), rtol=1e-2, atol=1e-2)


def test_text_cache_refuses_a_mismatched_config_and_unknown_captions(tmp_path):
  from lidit_jax import model as model_lib, text_cache
  config = tiny_config()
  towers = model_lib.build_towers(config)
  params = model_lib.load_tower_params(config, towers)
  text_cache.write(str(tmp_path), config, towers, params, ["a red circle", "a blue square"], batch_size=4,
                   progress=False)
  cache = text_cache.TextCache(str(tmp_path), config, towers)
  out = cache(["a blue square", "a red circle"])
  direct = towers[0].features(params["llama_a"], *(jnp.asarray(pipeline.tokenize(towers, ["a blue square"])
                                                               ["llama_a"][k]) for k in ("input_ids", "attention_mask")))
  np.testing.assert_array_equal(np.asarray(out["llama_a"]["hidden"][0], np.float32), np.asarray(direct[0], np.float32))
  with pytest.raises(KeyError, match="a green star"):
    cache(["a green star"])
  other = tiny_config(**{"text.towers.llama_a.layer": -2})
  with pytest.raises(ValueError, match="llama_a"):
    text_cache.TextCache(str(tmp_path), other, model_lib.build_towers(other))
  with pytest.raises(FileExistsError):
    text_cache.write(str(tmp_path), config, towers, params, ["x"], progress=False)


def test_export_safetensors_holds_the_ema_weights_in_torch_layouts(trained, tmp_path, capsys):
  """`export safetensors WORKDIR` writes every trainable parameter under its documented key, and PyTorch's
  Linear / conv2d on the exported tensors compute what our Dense, head-split attention and Conv compute."""
  torch = pytest.importorskip("torch")
  from safetensors import safe_open
  from safetensors.torch import load_file
  from lidit_jax import export
  F = torch.nn.functional
  config, workdir = trained
  out = str(tmp_path / "model.safetensors")
  assert export.main(["safetensors", workdir, out]) == 0
  got = load_file(out)
  _, params, step = state_lib.restore_for_inference(config, workdir)
  with safe_open(out, "np") as f:
    meta = f.metadata()
  assert json.loads(meta["lidit_jax.config"])["model"]["depth"] == config.model.depth
  assert int(meta["lidit_jax.step"]) == step
  flat = {"/".join(k.key for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  depth = config.model.depth
  per_layer = sum(1 for k in flat if k.startswith("denoiser/blocks/"))
  assert len(got) == len(flat) + per_layer * (depth - 1)  # every parameter, the stack split per layer
  rng = np.random.default_rng(0)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))
  # a Dense of the last block
  k, b = flat["denoiser/blocks/block/mlp/fc1/kernel"][-1], flat["denoiser/blocks/block/mlp/fc1/bias"][-1]
  x = rng.standard_normal((3, k.shape[0])).astype(np.float32)
  np.testing.assert_allclose(F.linear(t(x), got[f"denoiser.blocks.{depth - 1}.block.mlp.fc1.weight"],
                                      got[f"denoiser.blocks.{depth - 1}.block.mlp.fc1.bias"]).numpy(), x @ k + b,
                             rtol=1e-5, atol=1e-5)
  # attention: q [D, H, K] in, out [H, K, D] back
  attn = "conditioner/token_refiner_0/block_0/attn"
  q, qb = flat[f"{attn}/query/kernel"], flat[f"{attn}/query/bias"]
  o, ob = flat[f"{attn}/out/kernel"], flat[f"{attn}/out/bias"]
  key = attn.replace("/", ".")
  x = rng.standard_normal((3, q.shape[0])).astype(np.float32)
  heads = np.einsum("bd,dhk->bhk", x, q) + qb
  ours = np.einsum("bhk,hkd->bd", heads, o) + ob
  theirs = F.linear(F.linear(t(x), got[f"{key}.query.weight"], got[f"{key}.query.bias"]),
                    got[f"{key}.out.weight"], got[f"{key}.out.bias"])
  np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-4, atol=1e-5)
  # a 3x3 conv of the positional ResBlock
  conv = next(k for k in flat if k.endswith("kernel") and flat[k].ndim == 4 and "/blocks/" not in k)
  w, cb = flat[conv], flat[conv.replace("kernel", "bias")]
  x = rng.standard_normal((1, 5, 5, w.shape[2])).astype(np.float32)
  ours = jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + cb
  name = conv.replace("/", ".").replace(".kernel", ".weight")
  theirs = F.conv2d(t(x.transpose(0, 3, 1, 2)), got[name], got[name.replace(".weight", ".bias")], padding=1)
  np.testing.assert_allclose(theirs.numpy().transpose(0, 2, 3, 1), np.asarray(ours), rtol=1e-4, atol=1e-5)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:  # never over a file the exporter did not write
    export.main(["safetensors", workdir, os.path.join(workdir, "config.json")])
  assert e.value.code == 2 and "already exists" in capsys.readouterr().err


def test_the_demo_samples_only_after_the_last_step(trained):
  """A demo run stopped early (SIGTERM) leaves sampling and evaluation to the resumed run: `python -m lidit_jax`
  compares the latest checkpoint's step with train.num_steps before going on."""
  from lidit_jax.__main__ import trained_steps
  config, workdir = trained
  assert trained_steps(workdir) == config.train.num_steps == 6
  assert trained_steps(workdir + "_none") == 0
