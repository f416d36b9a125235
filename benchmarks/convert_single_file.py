"""`convert single-file` of a synthetic SD 1.5-size original checkpoint (~1.07 B parameters in float16): seconds
and peak memory against the file's size.

  python -m benchmarks.convert_single_file [--quick] [--workdir DIR] [--no-record]

1. Writes a random float16 single file with SD 1.5's tensors in the original layout (the U-Net's
   `model.diffusion_model.*`, 860 M; the VAE's `first_stage_model.*`, 84 M; CLIP-L's
   `cond_stage_model.transformer.text_model.*`, 123 M), keys and shapes from our own export mapping (which
   tests/test_pipeline.py checks against diffusers' single-file converter), one tensor in memory at a time;
   and a config folder (the components' config.json, a tokenizer, the scheduler, model_index.json).
2. Reads the file twice with plain reads (the yardstick), warm.
3. Runs `python -m lidit_jax.convert single-file FILE OUT --config CFG --dtype float16` in a fresh process:
   wall seconds and its peak RSS (ru_maxrss). Goal: peak RSS at most 1.3x the file.
Prints one JSON line; unless --quick / --no-record, adds a row to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
QUICK_CLIP = dict(SD15_CLIP, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)


def components(quick: bool):
  """{name: (config dict, {original key: shape})} of the three models, from abstract parameters."""
  import jax
  from lidit_jax.convert import diffusers_unet, diffusers_vae, hf_clip
  from lidit_jax.models import unet, vae
  ucfg = (unet.UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_heads=(8, 8),
                          transformer_layers_per_block=(1, 1), cross_attention_dim=32, sample_size=8)
          if quick else unet.UNetConfig())
  vcfg = vae.VAEConfig(block_out_channels=(32, 64)) if quick else vae.VAEConfig()
  ccfg = hf_clip.with_head(hf_clip.config_from_hf(QUICK_CLIP if quick else SD15_CLIP), False)
  fake = lambda module_params: jax.tree.map(lambda s: np.broadcast_to(np.float16(0), s.shape), module_params)
  up = fake(diffusers_unet.abstract_params(diffusers_unet.make_module(ucfg, np.float32)))
  vp = fake(diffusers_vae.abstract_params(diffusers_vae.make_module(vcfg, np.float32)))
  cp = fake(hf_clip.abstract_params(hf_clip.make_module(ccfg, np.float32)))
  shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}
  clip_config, clip_state = hf_clip.to_hf(ccfg, cp)
  return {"unet": (diffusers_unet.to_diffusers(ucfg, up)[0], shapes(diffusers_unet.to_ldm(ucfg, up))),
          "vae": (diffusers_vae.to_diffusers(vcfg, vp)[0], shapes(diffusers_vae.to_ldm(vcfg, vp))),
          "text_encoder": (clip_config, {"cond_stage_model.transformer." + k: tuple(v.shape)
                                         for k, v in clip_state.items()})}


def write_file(path: str, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> int:
  """The safetensors layout (u64 header size, JSON header, data), float16, written tensor by tensor."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape in shapes.items():
    size = int(np.prod(shape)) * 2
    header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  rng = np.random.default_rng(seed)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for shape in shapes.values():
      f.write((rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16).tobytes())
  return os.path.getsize(path)


def write_config_folder(out: str, parts: dict) -> None:
  import transformers
  for name, (config, _) in parts.items():
    os.makedirs(os.path.join(out, name))
    with open(os.path.join(out, name, "config.json"), "w") as f:
      json.dump(config, f)
  vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "a</w>": 3}
  transformers.CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>",
                             model_max_length=77).save_pretrained(os.path.join(out, "tokenizer"))
  os.makedirs(os.path.join(out, "scheduler"))
  with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": True,
               "steps_offset": 1, "set_alpha_to_one": False}, f)
  with open(os.path.join(out, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
               "safety_checker": [None, None], "feature_extractor": [None, None]}, f)


def write_inputs(work: str, quick: bool) -> int:
  parts = components(quick)
  shapes = {k: v for _, (_, s) in parts.items() for k, v in s.items()}
  size = write_file(os.path.join(work, "sd15.safetensors"), shapes)
  write_config_folder(os.path.join(work, "config"), parts)
  print(json.dumps({"file_bytes": size, "params": sum(int(np.prod(s)) for s in shapes.values())}))
  return 0


def read_twice(path: str, chunk: int = 64 << 20) -> float:
  buf = memoryview(bytearray(chunk))
  t = time.perf_counter()
  for _ in range(2):
    with open(path, "rb", buffering=0) as f:
      while f.readinto(buf):
        pass
  return time.perf_counter() - t


def convert(file: str, cfg: str, out: str) -> dict:
  """The CLI in a fresh process: wall seconds, its own peak RSS (wait4: not another child's) and its JSON line."""
  cmd = [sys.executable, "-m", "lidit_jax.convert", "single-file", file, out, "--config", cfg, "--dtype", "float16"]
  t = time.perf_counter()
  with tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if status:
      err.seek(0)
      raise RuntimeError(f"conversion failed:\n{err.read()[-3000:]}")
  return {"seconds": wall, "peak_rss": usage.ru_maxrss * 1024, "report": json.loads(stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny models (a check that the benchmark runs)")
  parser.add_argument("--workdir", help="where the synthetic checkpoint goes (default: a temp dir, deleted)")
  parser.add_argument("--no-record", action="store_true")
  parser.add_argument("--write", metavar="DIR", help=argparse.SUPPRESS)  # the child that writes the checkpoint
  args = parser.parse_args(argv)
  if args.write:
    return write_inputs(args.write, args.quick)
  work = args.workdir or tempfile.mkdtemp(prefix="sd_single_file_")
  try:
    # Written by a child, so that this process stays small: the converter's process is forked from it, and a
    # fork's peak RSS (ru_maxrss, kept across exec) starts at the parent's.
    t = time.perf_counter()
    made = json.loads(subprocess.run([sys.executable, "-m", "benchmarks.convert_single_file", "--write", work]
                                     + (["--quick"] if args.quick else []), cwd=REPO, check=True,
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1])
    write_s = time.perf_counter() - t
    file, cfg = os.path.join(work, "sd15.safetensors"), os.path.join(work, "config")
    read_twice(file)  # warm the page cache
    baseline = read_twice(file)
    run = convert(file, cfg, os.path.join(work, "out"))
    peak, size = run["peak_rss"], made["file_bytes"]
    result = {"params": made["params"], "file_bytes": size, "write_s": round(write_s, 1),
              "read_x2_s": round(baseline, 2), "convert_s": round(run["seconds"], 1), "peak_rss": peak,
              "peak_over_file": round(peak / size, 3),
              "components": {k: v["params"] for k, v in run["report"]["components"].items()}}
  finally:
    if not args.workdir:
      shutil.rmtree(work, ignore_errors=True)
  print(json.dumps(result))
  if not (args.quick or args.no_record):
    record(result)
  return 0


def record(r: dict, path: str = os.path.join(REPO, "benchmarks", "RESULTS.md")) -> None:
  import jax
  cores = len(os.sched_getaffinity(0))
  lines = ["\n## SD 1.5 single-file conversion (`python -m benchmarks.convert_single_file`)\n",
           f"{datetime.date.today()}, {platform.machine()}, {cores} cores, jax {jax.__version__}: a synthetic "
           f"float16 SD 1.5 checkpoint in the original layout, {r['params'] / 1e9:.2f} B parameters, "
           f"{r['file_bytes'] / 1e9:.2f} GB, converted by `convert single-file --dtype float16` in a fresh "
           "process (imports included), page cache warm.\n",
           "| file GB | read twice s | convert s | peak RSS GB | peak / file (goal <= 1.3) |", "|---|---|---|---|---|",
           f"| {r['file_bytes'] / 1e9:.2f} | {r['read_x2_s']:.1f} | {r['convert_s']:.1f} | {r['peak_rss'] / 1e9:.2f} "
           f"| {r['peak_over_file']:.2f} |"]
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  sys.exit(main())
