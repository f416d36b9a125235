"""LoRA runs through the shared trainer (lora.rank > 0): on configs/sd15.py over a tiny SD 1.5-style pipeline and on
LI-DiT (its base a short full run, `model.init`), only the factors train and are checkpointed, the run is preempted
and resumes on the uninterrupted run's losses, the model sampled from the workdir is the base with the factors
merged into the targeted kernels alone; and on eight simulated devices the losses are one device's."""
import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lidit_jax import configs, export, lora, sample, state, train
from lidit_jax import checkpoint as ckpt_lib
from lidit_jax.data import pipeline
from lidit_jax.pipeline import Pipeline

from conftest import ROOT, one_and_eight_device_losses, train_preempted
from test_sd_finetune import sd_config

SHORT = {"train.num_steps": 3, "train.log_every": 1, "train.checkpoint_every": 1, "train.sample_every": 100,
         "optim.lr": 1e-2, "optim.warmup_steps": 0}


def losses(workdir) -> dict:
  return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))}


def flat(tree) -> dict:
  return {ckpt_lib.param_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def lidit_config(tmp_path, **lora):
  """configs/shapes.py:tiny fine-tuned with LoRA from a short full run (a fresh DiT's adaLN-zero gates would give
  its attention no gradient)."""
  tiny = f"{ROOT / 'configs' / 'shapes.py'}:tiny"
  base = configs.validate(configs.apply_overrides(configs.load_config_file(tiny), SHORT))
  train.train_and_evaluate(base, str(tmp_path / "base"))
  return configs.validate(configs.apply_overrides(base, {"model.init": str(tmp_path / "base"), **lora}))


def sd15_config(tmp_path, **lora):
  from test_pipeline import sd15  # local: builds diffusers' pipeline (torch)
  sd15(tmp_path / "sd15")
  return sd_config("sd15", tmp_path / "sd15", **{**SHORT, "optim.lr": 1e-3, **lora})


@pytest.mark.parametrize("make, kernels, module", [
    (lidit_config, r"^(denoiser/blocks/.*/(self_attn|cross_attn)|conditioner/.*/(attn|cross_attn))/"
                   r"(query|key|value|out)/kernel$", "denoiser.blocks.1.block.self_attn.query"),
    (sd15_config, r"^denoiser/.*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"),  # diffusers' names
], ids=["lidit", "sd15"])
def test_lora_trains_resumes_samples_exports_and_loads(make, kernels, module, tmp_path, monkeypatch):
  config = make(tmp_path, **{"lora.rank": 2, "lora.alpha": 4.0})
  train.train_and_evaluate(config, str(tmp_path / "reference"))
  left = train_preempted(config, str(tmp_path / "resumed"), monkeypatch, pipeline.ShapesBatches, at_batch=3)
  assert left and max(left) < 3
  want, got = losses(tmp_path / "reference"), losses(tmp_path / "resumed")
  assert list(got) == list(want) == [1, 2, 3] and len(set(want.values())) == 3
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, got, want)
  grad_norms = [json.loads(line)["grad_norm"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert min(grad_norms) > 0  # the factors learn

  # The checkpoint holds the factors (A and B beside each default target: the family's and the conditioner's
  # attention projections),
  # their EMA and optimizer state: nothing of the base.
  s = state.setup(config, abstract=True)
  saved = flat(ckpt_lib.require(str(tmp_path / "resumed")).restore(s.abstract_state)[0].ema_params)
  targets = {n.rsplit("/", 1)[0] for n in saved}
  assert {n.rsplit("/", 1)[1] for n in saved} == {"A", "B"} and all(re.search(kernels, t) for t in targets)
  names = [ckpt_lib.param_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(s.abstract_params)]
  assert targets == {n for n in names if re.search(kernels, n)}
  assert sum(a.size for a in saved.values()) < sum(a.size for a in jax.tree.leaves(s.abstract_params)) / 4

  # Sampled from the workdir: the base (model.init's weights) with the EMA factors merged into the targets alone.
  pipe = Pipeline.from_pretrained(str(tmp_path / "resumed"))
  base_config = configs.apply_overrides(config, {"lora.rank": 0})
  base = flat(Pipeline.from_pretrained(base_config).backend.params["model"])
  merged = flat(pipe.backend.params["model"])
  assert merged.keys() == base.keys()
  moved = {n for n in base if not np.array_equal(merged[n], base[n])}
  assert moved == targets, sorted(moved ^ targets)[:3]
  images = pipe(["a red circle", "a blue square"], num_steps=2, seed=1)
  assert np.isfinite(images).all() and images.std() > 0

  # Exported (peft's keys, the family's module names, alpha in the metadata) and loaded onto the base model: the
  # run's model and images; two halves stack to the whole, scale 0 is the base.
  out = export.export_lora(str(tmp_path / "resumed"), str(tmp_path / "lora.safetensors"))
  with safe_open(out, framework="numpy") as f:
    keys, meta = set(f.keys()), f.metadata()
  layers = lambda t: saved[f"{t}/A"].shape[0] if s.lora.kernels[tuple(t.split("/"))][0] == "layers" else 1
  assert {f"{module}.lora_A.weight", f"{module}.lora_B.weight"} <= keys
  assert len(keys) == 2 * sum(map(layers, targets))  # a stack (the DiT's blocks): a pair per layer
  fields = json.loads(meta[lora.METADATA])  # peft's LoraConfig per component, as diffusers packs it ("unet.r")
  component = module.partition(".")[0]
  assert fields[f"{component}.lora_alpha"] == 4.0 and fields[f"{component}.r"] == 2
  assert module.partition(".")[2] in fields[f"{component}.target_modules"]
  loaded = Pipeline.from_pretrained(base_config).load_lora(out)
  for n, v in flat(loaded.backend.params["model"]).items():
    np.testing.assert_allclose(v, merged[n], rtol=1e-5, atol=1e-6, err_msg=n)
  np.testing.assert_allclose(loaded(["a red circle", "a blue square"], num_steps=2, seed=1), images, atol=1e-5)
  halves = Pipeline.from_pretrained(base_config).load_lora(out, 0.5).load_lora(out, 0.5)
  for n, v in flat(halves.backend.params["model"]).items():
    np.testing.assert_allclose(v, merged[n], rtol=1e-5, atol=1e-6, err_msg=n)
  none = flat(Pipeline.from_pretrained(base_config).load_lora(out, 0.0).backend.params["model"])
  assert all(np.array_equal(none[n], base[n]) for n in base)
  if make is lidit_config:  # the command line: `sample --lora PATH:SCALE` (twice: they stack), and a bad one
    cmd = [sys.executable, "-m", "lidit_jax.sample", "--config", f"{ROOT / 'configs' / 'shapes.py'}:tiny",
           f"--config.model.init={tmp_path / 'base'}", "--prompt", "a red circle", "--steps", "2",
           "--out", str(tmp_path / "cli.png"), "--lora", f"{out}:0.5", "--lora", f"{out}:0.5"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    sample.save_grid(sample.to_uint8(loaded(["a red circle"], num_steps=2, seed=0)), str(tmp_path / "api.png"))
    want, got = (np.asarray(Image.open(tmp_path / f).convert("RGB")) for f in ("api.png", "cli.png"))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    r = subprocess.run(cmd[:-4] + ["--lora", f"{tmp_path / 'missing.safetensors'}:0.5"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "missing.safetensors" in r.stderr and "Traceback" not in r.stderr

  # A LoRA for another model: refused by its first foreign key, or by shape, naming the module.
  other = dict(load_file(out))
  other["denoiser.nothing_here.lora_A.weight"] = other[f"{module}.lora_A.weight"]
  save_file(other, str(tmp_path / "other.safetensors"))
  with pytest.raises(ValueError, match="nothing_here"):
    loaded.load_lora(str(tmp_path / "other.safetensors"))
  wrong = dict(load_file(out))
  wrong[f"{module}.lora_A.weight"] = np.zeros((2, 3), np.float32)
  save_file(wrong, str(tmp_path / "wrong.safetensors"))
  with pytest.raises(ValueError, match=re.escape(f"{module}.lora_A.weight has shape (2, 3)")):
    loaded.load_lora(str(tmp_path / "wrong.safetensors"))


def test_lora_section_is_checked_before_any_compute(tmp_path):
  tiny = lambda: configs.load_config_file(f"{ROOT / 'configs' / 'shapes.py'}:tiny")
  for overrides, key in (({"lora.rank": -1}, "lora.rank"), ({"lora.conv_rank": 2}, "lora.conv_rank"),
                         ({"lora.rank": 2, "lora.dropout": 1.0}, "lora.dropout"),
                         ({"lora.rank": 2, "lora.targets": ("(",)}, "lora.targets"),
                         ({"lora.targets": ("attn",)}, "lora.targets")):
    with pytest.raises(configs.ConfigError, match=re.escape(f"config {key}=")):
      configs.validate(configs.apply_overrides(tiny(), overrides))
  # a pattern matching no kernel is refused by name when the model is known (nothing is initialised)
  typo = configs.validate(configs.apply_overrides(tiny(), {"lora.rank": 2, "lora.targets": ("denoiser/.*/qkv",)}))
  with pytest.raises(configs.ConfigError, match=r"'denoiser/\.\*/qkv'.*matches no kernel"):
    state.setup(typo, abstract=True)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lidit", "sd15"])
def test_lora_on_eight_devices_logs_the_one_device_losses(model, tmp_path):
  """4 data x 2 fsdp: the base and the factors sharded by their logical axes (a scanned stack's pairs per layer)."""
  flags = ["--config.train.batch_size=8", "--config.train.num_steps=3", "--config.train.log_every=1",
           "--config.train.sample_every=100", "--config.lora.rank=2", "--config.optim.warmup_steps=0"]
  if model == "lidit":  # a fresh DiT: its modulation kernels are what has a gradient (the adaLN-zero gates)
    arg = f"{ROOT / 'configs' / 'shapes.py'}:tiny"
    flags += [r"--config.lora.targets=('denoiser/blocks/.*/modulation/kernel', 'denoiser/final_proj')",
              "--config.optim.lr=1e-2"]
  else:
    from test_pipeline import sd15  # local: builds diffusers' pipeline (torch)
    sd15(tmp_path / "sd15")
    arg = f"{ROOT / 'configs' / 'sd15.py'}:{tmp_path / 'sd15'}"
    flags += ["--config.model.dtype=float32", "--config.data.source=shapes", "--config.data.max_objects=1",
              "--config.optim.lr=1e-3", "--config.text.towers.clip.dtype=float32"]
  got = one_and_eight_device_losses(arg, flags, ["--config.mesh.data=4", "--config.mesh.fsdp=2"], tmp_path)
  assert len(got["one"]) == 3 and got["one"][0] != got["one"][-1]
  np.testing.assert_allclose(got["eight"], got["one"], rtol=1e-4)


def test_plan_counts_the_factors_optimizer_state_alone():
  """`plan` with LoRA: gradients, optimizer state and EMA are the factors' (as the train state holds them), the
  base is counted once as frozen weights, and the merged copies of the targeted kernels are named."""
  from lidit_jax import plan  # local: the planner's imports are heavy for the other tests
  tiny = configs.load_config_file(f"{ROOT / 'configs' / 'shapes.py'}:tiny")
  full = plan.plan(configs.validate(tiny), 1)
  config = configs.validate(configs.apply_overrides(tiny, {"lora.rank": 2}))
  got = plan.plan(config, 1)
  factors = state.setup(config, abstract=True).abstract_state.params
  n = sum(a.size for a in jax.tree.leaves(factors))
  assert got["trainable_params"] == n and got["lora_base_params"] == full["trainable_params"] > 10 * n
  b = got["bytes_per_device"]
  assert b["grads"] == b["ema"] == b["lora_factors"] == 4 * n and b["optimizer"] == 8 * n
  assert b["params"] == full["bytes_per_device"]["params"] and 0 < b["lora_merged_kernels"] < b["params"]
