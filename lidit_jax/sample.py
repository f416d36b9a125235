"""Sampling: prompts -> images with the EMA weights, the ODE sampler, classifier-free guidance and the
autoencoder's decoder (latents never leave the generator: every image here is pixels).

  python -m lidit_jax.sample --workdir runs/shapes
      --prompt "a red circle to the left of a blue square" --out sample.png [--num_images 4 --cfg 3 --steps 25]
  python -m lidit_jax.sample --workdir path/to/stable-diffusion-v1-5 --prompt "..." --negative_prompt "..."

Through `lidit_jax.pipeline.Pipeline`, in batches of --batch_size. --config (with overrides) replaces the
workdir's saved config.json.

One PNG per prompt at --out (a grid when --num_images > 1). With several prompts (repeated --prompt or
--prompts_file), --out names a directory, or a file whose stem gets a _000, _001, ... suffix.
"""
from __future__ import annotations

import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lidit_jax import objectives
from lidit_jax.objectives import guidance
from lidit_jax import model as model_lib
from lidit_jax import sharding


def text_inputs(towers, tower_params, text):
  """Frozen-tower features and masks for the denoiser, from tokenized prompts (the towers run here) or
  from cached features (`text_cache`: the towers are not needed)."""
  feats = [text[t.name]["hidden"] if "hidden" in text[t.name] else
           t.features(tower_params[t.name], text[t.name]["input_ids"], text[t.name]["attention_mask"])
           for t in towers]
  valids = [text[t.name]["attention_mask"].astype(bool) for t in towers]
  prompts = [text[t.name]["prompt_mask"].astype(bool) for t in towers]
  return feats, valids, prompts


def make_generator(s, steps: int, cfg_scale: float, sampler: str):
  """Jitted (params, frozen, tokens, noise) -> images in [-1, 1] (noise in latent space, `Setup.frozen`)."""
  config = s.config
  objective = objectives.build(config)

  def generate(params, frozen, tokens, noise):
    feats, valids, prompts = text_inputs(s.towers, frozen["towers"], tokens)
    b = noise.shape[0]
    apply = functools.partial(s.model.apply, {"params": params})
    if cfg_scale == 1.0:  # guidance off: one conditional evaluation per step
      net = lambda x, t: apply(x, t, feats, valids, prompts, jnp.zeros((b,), bool))
    else:
      two = lambda xs: [jnp.concatenate([x, x]) for x in xs]
      drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
      def both(x, t):
        p = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]), two(feats), two(valids), two(prompts), drop)
        return p[:b], p[b:]
      net = guidance.guided(both, cfg_scale)
    # Samplers that draw noise at every step (euler_ancestral) draw it from a fixed key: the seed is in `noise`.
    latents = objective.sample(net, noise, steps, sampler, jax.random.key(0))
    return jnp.clip(s.autoencoder.decode(frozen["autoencoder"], latents).astype(jnp.float32), -1.0, 1.0)

  repl = sharding.replicated(s.mesh)
  # Images come back whole on every process (several processes cannot read a sharded result).
  jitted = jax.jit(generate, out_shardings=repl)

  def run(params, frozen, tokens, noise):
    # Host inputs become global arrays, identical on every process.
    host = jax.tree.map(lambda x: jax.make_array_from_process_local_data(repl, np.asarray(x)), (tokens, noise))
    with sharding.active(s.mesh, config):
      return jitted(params, frozen, *host)
  return run


def generate_images(s, params, prompts: list[str], num_images: int = 1, seed: int = 0, steps: int = 25,
                    cfg_scale: float = 3.0, sampler: str = "euler", batch_size: int = 64, generator=None,
                    noise_ids: list[int] | None = None):
  """uint8 images [len(prompts), num_images, H, W, C]; noise depends only on (seed, noise id, image index), the
  noise id being the prompt's index unless `noise_ids` gives one per prompt (prompts sharing an id share noise)."""
  gen = generator or make_generator(s, steps, cfg_scale, sampler)
  noise_ids = list(range(len(prompts))) if noise_ids is None else list(noise_ids)
  flat = [(i, j, p) for i, p in enumerate(prompts) for j in range(num_images)]
  shape = model_lib.latent_shape(s.config)
  size = s.config.data.image_size
  out = np.zeros((len(prompts), num_images, size, size, 3), np.uint8)
  for start in range(0, len(flat), batch_size):
    chunk = flat[start:start + batch_size]
    pad = batch_size - len(chunk) if len(flat) > batch_size else 0  # keep one compiled shape
    items = chunk + [chunk[-1]] * pad
    tokens = s.text_for([p for _, _, p in items])
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), noise_ids[i]), j),
                                         shape) for i, j, _ in items])
    x = np.asarray(gen(params, s.frozen, tokens, noise))
    for (i, j, _), img in zip(chunk, x[:len(chunk)]):
      out[i, j] = to_uint8(img)
  return out


def to_uint8(x):
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images, path: str, cols: int | None = None, scale: int = 4):
  """Save [N, H, W, C] uint8 images as one PNG grid (nearest-neighbour upscaled so 32 px is visible)."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  pad = 2
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for k, img in enumerate(images):
    r, q = divmod(k, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
  pil = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
  pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  if "://" in path:  # a bucket: encode here, write through epath
    import io
    from etils import epath
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_bytes(buf.getvalue())
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  pil.save(path)


def output_paths(out: str, prompts: list[str]) -> list[str]:
  if len(prompts) == 1 and out.lower().endswith(".png"):
    return [out]
  if out.lower().endswith(".png"):
    stem = out[:-4]
    return [f"{stem}_{i:03d}.png" for i in range(len(prompts))]
  slug = lambda p: re.sub(r"[^a-z0-9]+", "_", p.lower()).strip("_")[:60]
  return [os.path.join(out, f"{i:03d}_{slug(p)}.png") for i, p in enumerate(prompts)]


def main(argv):
  from lidit_jax import distributed
  distributed.initialize()  # first: several processes (TPU VM workers, GPU nodes) become one runtime
  from absl import flags
  from lidit_jax import cli, configs
  from lidit_jax.pipeline import Pipeline, Workdir
  f = flags.FLAGS
  prompts = list(f.prompt or [])
  if f.prompts_file:
    with open(f.prompts_file, encoding="utf-8") as fh:
      prompts += [line.strip() for line in fh if line.strip()]
  if not prompts:
    raise cli.UserError("no prompt given. Fix: use --prompt \"...\" (repeatable) or --prompts_file FILE")
  if f["config"].value is None:  # a diffusers pipeline folder, or a workdir with the config.json it saved
    pipe = Pipeline.from_pretrained(f.workdir, dtype=None)
  else:
    config = configs.load_from_flags()
    sampler = f.sampler or config.sample.sampler
    names = objectives.objective(config).SAMPLERS
    if sampler not in names:  # refused before anything is loaded
      raise cli.UserError(f"--sampler={sampler!r} is not a sampler of objective.kind={config.objective.kind!r}. "
                          f"Fix: use one of {', '.join(names)}")
    pipe = Pipeline(Workdir.load(f.workdir, None, config))
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
  images = to_uint8(images * 2.0 - 1.0).reshape(len(prompts), f.num_images, *images.shape[1:])
  for path, p, grid in zip(output_paths(f.out, prompts), prompts, images):
    save_grid(grid, path, cols=min(f.num_images, 8))
    print(f"{path}: {p}")


def define_flags():
  from absl import flags
  from lidit_jax import configs
  configs.define_flags()
  flags.declare_key_flag("config")  # list --config under --help
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ (its config.json is used unless "
                      "--config is given), or a diffusers pipeline folder (model_index.json).", required=True)
  flags.DEFINE_multi_string("prompt", None, "Prompt (repeatable).")
  flags.DEFINE_string("prompts_file", None, "Text file with one prompt per line.")
  flags.DEFINE_string("negative_prompt", None, "Negative prompt (SD pipelines; our families guide with their "
                      "learned null context).")
  flags.DEFINE_string("out", "samples.png", "Output PNG (one prompt) or directory / stem (several prompts).")
  flags.DEFINE_integer("num_images", 1, "Images per prompt (saved as a grid).", lower_bound=1)
  flags.DEFINE_integer("batch_size", 8, "Images per batch (split over the devices).", lower_bound=1)
  flags.DEFINE_integer("steps", None, "Sampler steps (default: the model's: config.sample.steps, 50 for SD).",
                       lower_bound=1)
  flags.DEFINE_float("cfg", None, "Classifier-free guidance scale; 1 = off (default: the model's).")
  flags.DEFINE_string("sampler", None, "Sampler (default: config.sample.sampler or the folder's scheduler): "
                      "rectified flow euler | heun; DDPM ddim | pndm | euler | euler_ancestral | dpmpp_2m.")
  flags.DEFINE_integer("height", None, "Image height (SD pipelines; default: the U-Net's sample size).")
  flags.DEFINE_integer("width", None, "Image width (SD pipelines).")
  flags.DEFINE_integer("seed", 0, "Noise seed: image i of the run draws its noise from (seed, i).")


if __name__ == "__main__":
  from lidit_jax import cli
  define_flags()
  cli.run(main)
