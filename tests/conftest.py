import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def train_preempted(config, workdir, monkeypatch, batches_cls, at_batch: int) -> list[int]:
  """Train, preempted (KeyboardInterrupt) while fetching batch `at_batch`, then restart the same call: a
  resumed run, whose metrics a test compares with an uninterrupted one. Returns the checkpoint steps the
  interrupted run left (what the restart resumed from)."""
  from lidit_jax import train
  real_next, calls = batches_cls.__next__, {"n": 0}

  def flaky_next(self):
    calls["n"] += 1
    if calls["n"] == at_batch:
      raise KeyboardInterrupt("simulated preemption")
    return real_next(self)

  monkeypatch.setattr(batches_cls, "__next__", flaky_next)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir)
  left = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  monkeypatch.setattr(batches_cls, "__next__", real_next)
  train.train_and_evaluate(config, workdir)
  return left


def one_and_eight_device_losses(config_arg: str, flags, mesh, workdir, key: str = "loss") -> dict:
  """{"one": losses, "eight": losses} of `python -m lidit_jax.train --config config_arg` with `flags`, on one
  simulated device and on eight laid out as `mesh` (["--config.mesh.data=4", ...]); each run in WORKDIR/one|eight.
  `key`: the metric read from metrics.jsonl's lines that have it."""
  import json
  import os
  import subprocess
  import sys
  losses = {}
  for name, devices, layout in (("one", 1, []), ("eight", 8, list(mesh))):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    r = subprocess.run([sys.executable, "-m", "lidit_jax.train", "--config", config_arg, "--workdir",
                        str(workdir / name), *flags, *layout], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in open(workdir / name / "metrics.jsonl")]
    losses[name] = [line[key] for line in lines if key in line]
  return losses


def convert_then_export(tmp_path, capsys, prompts, latents, reference, dropped=()) -> None:
  """The pipeline folder tmp_path/pipe converted (`convert diffusers` -> ours) samples its images; exported back
  (`export diffusers` -> back) every component's tensors equal the folder's bit for bit (`dropped`: keys written
  once, such as a tied embedding), and `reference(folder)` (diffusers' images of a folder) draws ours from it."""
  import json
  import numpy as np
  from safetensors.numpy import load_file
  from lidit_jax import export
  from lidit_jax.convert.__main__ import main as convert_main
  from lidit_jax.pipeline import Pipeline
  assert convert_main(["diffusers", str(tmp_path / "pipe"), str(tmp_path / "ours")]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert {"transformer", "vae", "text_encoder"} <= set(report["components"])
  want = Pipeline.from_pretrained(str(tmp_path / "pipe"))(prompts, num_steps=3, latents=latents)
  np.testing.assert_allclose(Pipeline.from_pretrained(str(tmp_path / "ours"))(prompts, num_steps=3, latents=latents),
                             want, atol=1e-6)
  assert export.main(["diffusers", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
  for part, file in (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                     ("text_encoder", "model")):
    src, back = (load_file(str(tmp_path / d / part / f"{file}.safetensors")) for d in ("pipe", "back"))
    assert set(back) == set(src) - set(dropped), part
    for k, v in back.items():
      np.testing.assert_array_equal(v, src[k], err_msg=f"{part}: {k}")
  np.testing.assert_allclose(reference(str(tmp_path / "back")), want, atol=2e-3)


def finetune_resume_export(tmp_path, monkeypatch, config, prompts, latents, guidance, reference) -> None:
  """`config` (a shrunk fine-tuning config of the pipeline folder tmp_path/pipe) trains 3 steps; preempted and
  resumed it logs the same losses; its images (at `guidance`) moved off the folder's (`reference(folder)`: diffusers'
  images of a folder at that guidance) and, exported (`export diffusers`), diffusers draws them from the exported folder."""
  import json
  import numpy as np
  from lidit_jax import export, train
  from lidit_jax.data import pipeline as data_pipeline
  from lidit_jax.pipeline import Pipeline
  train.train_and_evaluate(config, str(tmp_path / "run"))
  left = train_preempted(config, str(tmp_path / "resumed"), monkeypatch, data_pipeline.ShapesBatches, at_batch=3)
  assert left and max(left) < 3
  losses = lambda d: [json.loads(line)["loss"] for line in open(tmp_path / d / "metrics.jsonl")]
  assert len(losses("run")) == 3 and np.isfinite(losses("run")).all()
  np.testing.assert_allclose(losses("resumed"), losses("run"), rtol=1e-5)
  ours = Pipeline.from_pretrained(str(tmp_path / "run"))(prompts, num_steps=3, guidance=guidance, latents=latents)
  assert np.abs(ours - reference(str(tmp_path / "pipe"))).max() > 1e-2  # the transformer trained off the folder's
  assert export.main(["diffusers", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
  np.testing.assert_allclose(reference(str(tmp_path / "back")), ours, atol=2e-3)


def lora_merged_into_diffusers(tmp_path, config, ref, reference, prompts, latents, guidance, num_pairs, key) -> None:
  """`config` (a shrunk fine-tuning config of tmp_path/pipe with lora.rank) trains; `export lora` writes `num_pairs`
  A / B pairs in diffusers' `transformer.` naming (`key` among them) with LoraConfig metadata; peft injected into
  `ref`'s transformer (diffusers' pipeline of that folder), loaded and merged, gives our run's images
  (`reference(ref)`: diffusers' images at `guidance`)."""
  import json
  import numpy as np
  import peft
  import torch
  from safetensors import safe_open
  from safetensors.numpy import load_file
  from lidit_jax import export, train
  from lidit_jax.pipeline import Pipeline
  train.train_and_evaluate(config, str(tmp_path / "run"))
  file = str(tmp_path / "lora.safetensors")
  assert export.main(["lora", str(tmp_path / "run"), file]) == 0
  tensors = load_file(file)
  assert len(tensors) == 2 * num_pairs and key in tensors, sorted(tensors)[:4]
  with safe_open(file, "np") as f:
    meta = {k.removeprefix("transformer."): v for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()}
  peft.inject_adapter_in_model(peft.LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"],
                                               target_modules=meta["target_modules"]), ref.transformer)
  loaded = peft.set_peft_model_state_dict(
      ref.transformer, {k.removeprefix("transformer."): torch.from_numpy(v) for k, v in tensors.items()})
  assert not loaded.unexpected_keys
  for module in ref.transformer.modules():
    if isinstance(module, peft.tuners.lora.LoraLayer):
      module.merge()
  ours = Pipeline.from_pretrained(str(tmp_path / "run"))(prompts, num_steps=3, guidance=guidance, latents=latents)
  base = Pipeline.from_pretrained(str(tmp_path / "pipe"))(prompts, num_steps=3, guidance=guidance, latents=latents)
  assert np.abs(ours - base).max() > 5 * 2e-3  # the LoRA moved the images
  np.testing.assert_allclose(reference(ref), ours, atol=2e-3)


def pipeline_config_on_eight_devices(name: str, folder, towers, tmp_path) -> None:
  """configs/{name}.py on the pipeline folder `folder`, float32 (its `towers` too) on the shapes data: 3 steps on
  eight simulated devices (data 4 x fsdp 2) log one device's losses."""
  import numpy as np
  flags = ["--config.model.dtype=float32", *[f"--config.text.towers.{t}.dtype=float32" for t in towers],
           "--config.data.source=shapes", "--config.data.max_objects=1", "--config.train.batch_size=8",
           "--config.train.num_steps=3", "--config.train.log_every=1", "--config.train.sample_every=100",
           "--config.optim.lr=1e-3", "--config.optim.warmup_steps=0", "--config.optim.grad_clip=1.0"]
  losses = one_and_eight_device_losses(f"{ROOT / 'configs' / name}.py:{folder}", flags,
                                       ["--config.mesh.data=4", "--config.mesh.fsdp=2"], tmp_path)
  assert len(losses["one"]) == 3 and losses["one"][0] != losses["one"][-1]
  np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-4)


def images_by_hand(s, params, prompts, noise, steps: int, cfg: float, sampler: str):
  """What a Pipeline on a workdir must give, computed step by step: the model (its null context for the
  unconditional half), guidance, the objective's sampler, the decoder; [0, 1] float32 images."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lidit_jax import denoisers, objectives, state as state_lib
  from lidit_jax.objectives import guidance
  feats, valids, keep = state_lib.text_inputs(s.towers, s.frozen["towers"], jax.tree.map(jnp.asarray,
                                                                                          s.text_for(prompts)))
  b = len(prompts)
  run = lambda x, t, drop: s.model.apply({"params": params}, x, t, feats, valids, keep, jnp.full((b,), drop))
  net = guidance.guided(lambda x, t: (run(x, t, False), run(x, t, True)), cfg)
  final = objectives.build(s.config, denoisers.geometry(s.config)).sample(net, jnp.asarray(noise), steps, sampler, jax.random.key(0))
  return np.clip(np.asarray(s.autoencoder.decode(s.frozen["autoencoder"], final), np.float32) / 2 + 0.5, 0, 1)


def tiny_config(**overrides):
  """configs/shapes.py:tiny, with dotted-key overrides (tests build from the real config, shrunk)."""
  from lidit_jax import configs
  c = configs.load_config_file(str(ROOT / "configs" / "shapes.py") + ":tiny")
  return configs.validate(configs.apply_overrides(c, overrides))


@pytest.fixture
def config():
  return tiny_config()


def _compilation_cache():
  """One persistent XLA compilation cache for the session and its subprocesses: the tiny config's train step
  and sampler are compiled once, not once per test (set before jax is imported)."""
  import atexit
  import os
  import shutil
  import tempfile
  # libtpu (the test extra: TPU compiles here) would have every process try a TPU first and warn; these tests run
  # on the CPU (tpu_compile targets its compile-only devices whatever this says)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lidit_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)


_compilation_cache()
