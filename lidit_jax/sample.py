"""Sampling: prompts -> images through `lidit_jax.pipeline.Pipeline` (a workdir's EMA weights, its objective's
sampler, classifier-free guidance and the autoencoder's decoder: every image here is pixels), and PNG grids.

  python -m lidit_jax.sample --workdir runs/shapes
      --prompt "a red circle to the left of a blue square" --out sample.png [--num_images 4 --cfg 3 --steps 25]
  python -m lidit_jax.sample --workdir path/to/stable-diffusion-v1-5 --prompt "..." --negative_prompt "..."

  python -m lidit_jax.sample --workdir path/to/stable-diffusion-v1-5 --lora style.safetensors:0.8 --prompt "..."

  python -m lidit_jax.sample --config configs/llm4gen_sd15.py:ROOT --prompt "..."   # no --workdir: the config's
      model as a run of it starts (model.init, released conditioner weights), untrained

Through `lidit_jax.pipeline.Pipeline`, in batches of --batch_size. --config (with overrides) replaces the
workdir's saved config.json.

One PNG per prompt at --out (a grid when --num_images > 1). With several prompts (repeated --prompt or
--prompts_file), --out names a directory, or a file whose stem gets a _000, _001, ... suffix. Each PNG is
written under a temporary name and renamed when complete; it carries the text chunk `Software: lidit_jax`, so
running the same command again replaces its own images, while any other existing file is refused by name
(checked before sampling) unless --overwrite.
"""
from __future__ import annotations

import io
import math
import os
import re

import jax
import numpy as np
from absl import flags
from etils import epath
from PIL import Image, PngImagePlugin

from lidit_jax import cli, configs, distributed, lora, objectives, outputs
from lidit_jax.pipeline import Pipeline, Workdir

SOFTWARE = "lidit_jax"  # the PNG text chunk `Software` that marks an image as ours (replaceable)


def generate_images(pipe, prompts: list[str], num_images: int = 1, seed: int = 0, steps: int | None = None,
                    cfg_scale: float | None = None, sampler: str | None = None, batch_size: int = 64,
                    noise_ids: list[int] | None = None) -> np.ndarray:
  """uint8 images [len(prompts), num_images, H, W, C] through a `pipeline.Pipeline` (steps, guidance, sampler:
  its defaults unless given); the noise depends only on (seed, noise id, image index), the noise id being the
  prompt's index unless `noise_ids` gives one per prompt (prompts sharing an id share noise)."""
  noise_ids = list(range(len(prompts))) if noise_ids is None else list(noise_ids)
  flat = [(i, j) for i in range(len(prompts)) for j in range(num_images)]
  key = jax.random.key(seed)
  noise = pipe.noise([jax.random.fold_in(jax.random.fold_in(key, noise_ids[i]), j) for i, j in flat])
  images = pipe([prompts[i] for i, _ in flat], num_steps=steps, guidance=cfg_scale, latents=noise, seed=seed,
                scheduler=sampler, batch_size=batch_size)
  return to_uint8(images).reshape(len(prompts), num_images, *images.shape[1:])


def to_uint8(x):
  """Images in [0, 1] (what a Pipeline returns) -> uint8."""
  return np.clip(np.round(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)


def is_ours(path: str) -> bool:
  """Whether `path` is a PNG this package wrote (its `Software` text chunk), which a new image may replace."""
  try:
    with Image.open(path) as img:
      return img.format == "PNG" and img.info.get("Software") == SOFTWARE
  except Exception:  # not an image, unreadable, a directory: not ours
    return False


def grid(images, cols: int | None = None, scale: int = 4, pad: int = 2) -> np.ndarray:
  """[N, H, W, C] uint8 images -> one uint8 grid [rows, cols] with `pad` px white gaps, nearest-neighbour upscaled by
  `scale` (so 32 px is visible)."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for k, img in enumerate(images):
    r, q = divmod(k, cols)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
  return out.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(images, path: str, cols: int | None = None, scale: int = 4, overwrite: bool = True):
  """Save [N, H, W, C] uint8 images as one PNG `grid`, written under a temporary name and renamed when complete.
  `overwrite=False` (the CLI's rule) refuses an existing file at `path` unless it is one of ours (`is_ours`)."""
  g = grid(images, cols, scale)
  pil = Image.fromarray(g.squeeze(-1) if g.shape[-1] == 1 else g)
  info = PngImagePlugin.PngInfo()
  info.add_text("Software", SOFTWARE)
  if "://" in path:  # a bucket (the trainer's samples): one object, written whole by epath
    buf = io.BytesIO()
    pil.save(buf, format="PNG", pnginfo=info)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_bytes(buf.getvalue())
    return
  with outputs.staged(path, overwrite, ours=is_ours, what="an image written by lidit_jax") as tmp:
    pil.save(tmp, format="PNG", pnginfo=info)


def output_paths(out: str, prompts: list[str]) -> list[str]:
  if len(prompts) == 1 and out.lower().endswith(".png"):
    return [out]
  if out.lower().endswith(".png"):
    stem = out[:-4]
    return [f"{stem}_{i:03d}.png" for i in range(len(prompts))]
  slug = lambda p: re.sub(r"[^a-z0-9]+", "_", p.lower()).strip("_")[:60]
  return [os.path.join(out, f"{i:03d}_{slug(p)}.png") for i, p in enumerate(prompts)]


def main(argv):
  distributed.initialize()  # first: several processes (TPU VM workers, GPU nodes) become one runtime
  f = flags.FLAGS
  prompts = list(f.prompt or [])
  if f.prompts_file:
    with open(f.prompts_file, encoding="utf-8") as fh:
      prompts += [line.strip() for line in fh if line.strip()]
  if not prompts:
    raise cli.UserError("no prompt given. Fix: use --prompt \"...\" (repeatable) or --prompts_file FILE")
  paths = output_paths(f.out, prompts)
  for path in paths:  # before sampling: a refused output costs no compute (a bucket's objects are replaced)
    if "://" not in path:
      outputs.preflight(path, f.overwrite, ours=is_ours, what="an image written by lidit_jax")
  loras = [lora.parse_arg(a) for a in f.lora or []]  # before anything is loaded
  if f["config"].value is None and not f.workdir:
    raise cli.UserError("nothing to sample. Fix: pass --workdir (a training workdir or a pipeline folder) and/or "
                        "--config (a config file: its model as a run of it starts)")
  if f["config"].value is None:  # a diffusers pipeline folder, or a workdir with the config.json it saved
    pipe = Pipeline.from_pretrained(f.workdir, dtype=None)
  else:
    config = configs.load_from_flags(data=False)
    sampler = f.sampler or config.sample.sampler
    names = objectives.objective(config).SAMPLERS
    if sampler not in names:  # refused before anything is loaded
      raise cli.UserError(f"--sampler={sampler!r} is not a sampler of objective.kind={config.objective.kind!r}. "
                          f"Fix: use one of {', '.join(names)}")
    pipe = Pipeline(Workdir.load(f.workdir, None, config) if f.workdir else Workdir.from_config(config))
  for path, scale in loras:
    try:
      pipe.load_lora(path, scale)
    except ValueError as e:  # a LoRA for another model, a damaged file: the user's to fix
      raise cli.UserError(f"--lora {path}: {e}") from e
  steps = f.steps or pipe.defaults["num_steps"]
  cfg = pipe.defaults["guidance"] if f.cfg is None else f.cfg
  where = f" from step {pipe.backend.step}" if isinstance(pipe.backend, Workdir) else ""
  print(f"sampling {len(prompts)} prompt(s) x {f.num_images}{where} ({f.sampler or 'default sampler'}, "
        f"{steps} steps, cfg {cfg})")
  flat = [p for p in prompts for _ in range(f.num_images)]
  try:
    images = pipe(flat, num_steps=steps, guidance=cfg, negative_prompt=f.negative_prompt, seed=f.seed,
                  scheduler=f.sampler, height=f.height, width=f.width, batch_size=f.batch_size, progress=True)
  except ValueError as e:  # a bad sampler, size or negative prompt for this model: the user's to fix
    raise cli.UserError(str(e)) from e
  images = to_uint8(images).reshape(len(prompts), f.num_images, *images.shape[1:])
  for path, p, grid in zip(paths, prompts, images):
    save_grid(grid, path, cols=min(f.num_images, 8), overwrite=f.overwrite)
    print(f"{path}: {p}")


def define_flags():
  configs.define_flags()
  flags.declare_key_flag("config")  # list --config under --help
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ (its config.json is used unless "
                      "--config is given), or a diffusers pipeline folder (model_index.json). Without it, --config's "
                      "model as a run of it starts (model.init and released weights, untrained).")
  flags.DEFINE_multi_string("prompt", None, "Prompt (repeatable).")
  flags.DEFINE_string("prompts_file", None, "Text file with one prompt per line.")
  flags.DEFINE_string("negative_prompt", None, "Negative prompt (SD pipelines and conditioner.null=empty_prompt models; others guide with their "
                      "learned null context).")
  flags.DEFINE_string("out", "samples.png", "Output PNG (one prompt) or directory / stem (several prompts).")
  flags.DEFINE_bool("overwrite", False, "Replace existing files at the output paths (images this package wrote "
                    "are replaced without it).")
  flags.DEFINE_integer("num_images", 1, "Images per prompt (saved as a grid).", lower_bound=1)
  flags.DEFINE_integer("batch_size", 8, "Images per batch (split over the devices).", lower_bound=1)
  flags.DEFINE_integer("steps", None, "Sampler steps (default: the model's: config.sample.steps, 50 for SD).",
                       lower_bound=1)
  flags.DEFINE_float("cfg", None, "Classifier-free guidance scale; 1 = off (default: the model's).")
  flags.DEFINE_string("sampler", None, "Sampler (default: config.sample.sampler or the folder's scheduler): "
                      "rectified flow euler | heun; DDPM ddim | pndm | euler | euler_ancestral | dpmpp_2m.")
  flags.DEFINE_integer("height", None, "Image height (SD pipelines; default: the U-Net's sample size).")
  flags.DEFINE_integer("width", None, "Image width (SD pipelines).")
  flags.DEFINE_multi_string("lora", None, "PATH[:SCALE]: a LoRA file merged into the weights, times SCALE (default "
                            "1); repeatable, they stack (`Pipeline.load_lora`).")
  flags.DEFINE_integer("seed", 0, "Noise seed: image i of the run draws its noise from (seed, i).")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
