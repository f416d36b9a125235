"""Benchmark image sets: the folders GenEval, T2I-CompBench and DPG-Bench score, generated from any model.

  python -m lidit_jax.benchmark geneval --prompts geneval/prompts/evaluation_metadata.jsonl --model runs/x --out G
  python -m lidit_jax.benchmark t2i_compbench --prompts T2I-CompBench/examples/dataset/color_val.txt --model M --out T
  python -m lidit_jax.benchmark dpg_bench --prompts ELLA/dpg_bench/prompts --model M --out D

--model is a training workdir, a diffusers or converted pipeline folder, or a config file (`Pipeline.from_pretrained`).
The prompts are read from the user's checkout of the benchmark (nothing is downloaded) and the layouts are the ones
the scorers read:
  geneval        OUT/NNNNN/metadata.jsonl (the prompt's metadata line) + OUT/NNNNN/samples/0000.png ... (4 each)
  t2i_compbench  OUT/samples/{prompt}_{NNNNNN}.png, numbered across the file as its scripts do (10 per prompt)
  dpg_bench      OUT/{prompt file's stem}.png: the prompt's images tiled two per row without gaps (4: a 2 x 2 grid;
                 score with `--pic-num 4 --resolution HEIGHT`)
Image j of a prompt draws its noise from (seed, the prompt's identity in its file, j): batching, devices, hosts and
resuming never change it (ancestral samplers' per-step noise excepted). Every batch runs on all devices of all hosts;
each host writes its share of the files (file k: host k mod hosts). Finished files are skipped, so an interrupted run
resumes where it stopped; each PNG records the settings that made it, and a run with other settings refuses the
folder rather than mix images.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from lidit_jax import cli, distributed, outputs
from lidit_jax.pipeline import Pipeline
from lidit_jax.sample import SOFTWARE, grid, to_uint8

SETTINGS_CHUNK = "lidit_jax benchmark"  # the PNG text chunk holding the settings that made an image
DEFAULT_IMAGES = {"geneval": 4, "t2i_compbench": 10, "dpg_bench": 4}
NAME_BYTES = 255  # a file name's limit on common file systems


@dataclasses.dataclass(frozen=True)
class Item:
  """One prompt of a benchmark: `key` is its identity in the prompt file (its noise derives from it), `files` the
  PNGs it becomes, each with the indices of the prompt's images it shows (one, or a DPG grid's all)."""
  key: str
  prompt: str
  files: tuple[tuple[str, tuple[int, ...]], ...]
  metadata: str | None = None  # GenEval: the prompt's metadata line, written beside its samples


def _read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f]


def geneval_items(path: str, n: int) -> list[Item]:
  items = []
  for i, line in enumerate(line for line in _read_lines(path) if line):
    try:
      meta = json.loads(line)
      prompt = meta["prompt"]
    except (ValueError, KeyError, TypeError) as e:
      raise cli.UserError(f"--prompts {path}: line {i + 1} is not a GenEval metadata object with a \"prompt\" "
                          f"({e}). Fix: pass GenEval's prompts/evaluation_metadata.jsonl") from e
    folder = f"{i:05d}"
    items.append(Item(folder, prompt, tuple((f"{folder}/samples/{j:04d}.png", (j,)) for j in range(n)),
                      json.dumps(meta)))
  return items


def t2i_compbench_items(path: str, n: int) -> list[Item]:
  items = []
  for i, prompt in enumerate(p for p in _read_lines(path) if p):
    name = f"{prompt}_{i * n:06d}.png"
    if "/" in prompt or "\0" in prompt or len(name.encode()) > NAME_BYTES:
      raise cli.UserError(f"--prompts {path}: prompt {i + 1} ({prompt[:60]!r}) cannot be a file name (T2I-CompBench "
                          f"names images by their prompt; a '/' or more than {NAME_BYTES} bytes cannot be). Fix: "
                          "shorten or remove it")
    items.append(Item(str(i), prompt, tuple((f"samples/{prompt}_{i * n + j:06d}.png", (j,)) for j in range(n))))
  return items


def dpg_bench_items(path: str, n: int) -> list[Item]:
  if not os.path.isdir(path):
    raise cli.UserError(f"--prompts {path}: not a directory. Fix: pass DPG-Bench's prompts/ folder (one .txt per "
                        "prompt)")
  items = []
  for file in sorted(glob.glob(os.path.join(path, "*.txt"))):
    stem = os.path.splitext(os.path.basename(file))[0]
    prompt = " ".join(p for p in _read_lines(file) if p)
    if prompt:
      items.append(Item(stem, prompt, ((f"{stem}.png", tuple(range(n))),)))
  return items


READERS = {"geneval": geneval_items, "t2i_compbench": t2i_compbench_items, "dpg_bench": dpg_bench_items}


def read_items(benchmark: str, prompts: str, num_images: int) -> list[Item]:
  if benchmark not in READERS:
    raise ValueError(f"benchmark={benchmark!r}: not one of {sorted(READERS)}")
  if not os.path.exists(prompts):
    raise cli.UserError(f"--prompts {prompts}: no such file or directory. Fix: pass the prompt file of your "
                        f"checkout of {benchmark}")
  items = READERS[benchmark](prompts, num_images)
  if not items:
    raise cli.UserError(f"--prompts {prompts}: no prompts in it. Fix: pass {benchmark}'s prompt file")
  return items


def settings_of(path: str) -> dict | None:
  """The settings an image of ours records, or None (not one of ours, unreadable)."""
  try:
    with Image.open(path) as img:
      return json.loads(img.info[SETTINGS_CHUNK])
  except Exception:
    return None


def _write_png(path: str, image: np.ndarray, settings: dict) -> None:
  info = PngImagePlugin.PngInfo()
  info.add_text("Software", SOFTWARE)
  info.add_text(SETTINGS_CHUNK, json.dumps(settings, sort_keys=True))
  with outputs.staged(path) as tmp:
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read().strip()


def _write_text(path: str, text: str) -> None:
  with outputs.staged(path, overwrite=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def _finished(out: str, files: list[str], settings: dict, host: int, hosts: int) -> np.ndarray:
  """Which files exist, as every host sees it: each host looks at its own share (its disk may be its own) and the
  answers are gathered, so all hosts agree on the batches to run. A file made with other settings is refused."""
  done = np.zeros(len(files), bool)
  mine = range(host, len(files), hosts) if jax.process_count() > 1 else range(len(files))
  for k in mine:
    path = os.path.join(out, files[k])
    if os.path.exists(path):
      found = settings_of(path)
      if found != settings:
        raise cli.UserError(f"{path} exists but was not made with these settings (it records {found}; this run: "
                            f"{settings}). Fix: pass the same settings to resume, or a new --out")
      done[k] = True
  if jax.process_count() > 1:
    done = multihost_utils.process_allgather(done).any(axis=0)
  return done


def write(pipe: Pipeline, benchmark: str, prompts: str, out: str, num_images: int | None = None,
          steps: int | None = None, guidance: float | None = None, height: int | None = None,
          width: int | None = None, seed: int = 0, batch_size: int | None = None, sampler: str | None = None,
          negative_prompt: str | None = None, model: str | None = None, host: int | None = None,
          hosts: int | None = None, progress: bool = True) -> dict:
  """Generate `benchmark`'s image set for the prompts at `prompts` into `out` (see the module's docstring);
  returns counts. `model` is recorded in every PNG with the settings. `host` / `hosts` default to this process and
  the process count (tests simulate hosts)."""
  num_images = num_images or DEFAULT_IMAGES[benchmark]
  items = read_items(benchmark, prompts, num_images)
  host = jax.process_index() if host is None else host
  hosts = jax.process_count() if hosts is None else hosts
  d = pipe.defaults
  settings = dict(benchmark=benchmark, model=model, step=getattr(pipe.backend, "step", None),
                  num_images=num_images, seed=seed,
                  steps=int(steps or d["num_steps"]), guidance=float(d["guidance"] if guidance is None else guidance),
                  height=int(height or d["height"]), width=int(width or d["width"]), sampler=sampler,
                  negative_prompt=negative_prompt)
  batch_size = batch_size or 4 * jax.device_count()
  files = [(i, path, shown) for i, item in enumerate(items) for path, shown in item.files]
  done = _finished(out, [path for _, path, _ in files], settings, host, hosts)
  wanted = sorted({(i, j) for (i, _, shown), d_ in zip(files, done) if not d_ for j in shown})
  pending = {k: files[k] for k in range(host, len(files), hosts) if not done[k]}  # this host's share
  for i in sorted({i for i, _, _ in pending.values()}):  # GenEval's metadata line beside the samples
    if items[i].metadata is not None:
      path = os.path.join(out, items[i].key, "metadata.jsonl")
      if not os.path.exists(path):
        _write_text(path, items[i].metadata)
      elif _read_text(path) != items[i].metadata:
        raise cli.UserError(f"{path} holds another prompt's metadata. Fix: --out a new folder, or the same --prompts")
  made: dict[tuple[int, int], np.ndarray] = {}
  written, start = 0, time.perf_counter()
  bar = tqdm(total=len(wanted), desc=f"{benchmark} images", unit="img", disable=not progress or host != 0)
  for at in range(0, len(wanted), batch_size):
    chunk = wanted[at:at + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled batch shape
    key = jax.random.key(seed)
    noise = pipe.noise([jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(items[i].key.encode()) & 0x7FFFFFFF),
                                           j) for i, j in padded], settings["height"], settings["width"])
    images = pipe([items[i].prompt for i, _ in padded], num_steps=settings["steps"], guidance=settings["guidance"],
                  negative_prompt=negative_prompt, seed=seed, latents=noise, height=settings["height"],
                  width=settings["width"], scheduler=sampler, batch_size=batch_size)
    made.update(zip(chunk, to_uint8(images[:len(chunk)])))
    for k, (i, path, shown) in list(pending.items()):
      if all((i, j) in made for j in shown):
        # one image, or DPG-Bench's: two per row without gaps
        image = grid(np.stack([made[(i, j)] for j in shown]), min(2, len(shown)), scale=1, pad=0)
        _write_png(os.path.join(out, path), image, settings)
        written += 1
        del pending[k]
    needed = {(i, j) for i, _, shown in pending.values() for j in shown}
    made = {ij: img for ij, img in made.items() if ij in needed}  # keep only a grid's images still to be tiled
    bar.update(len(chunk))
  bar.close()
  seconds = time.perf_counter() - start
  return dict(benchmark=benchmark, out=out, prompts=len(items), files=len(files), skipped=int(done.sum()),
              written=written, images=len(wanted), seconds=round(seconds, 2),
              images_per_second=round(len(wanted) / seconds, 3) if wanted else None)


def images_and_prompts(out: str, prompts: str | None = None) -> list[tuple[str, str]]:
  """The (image path, prompt) pairs of a benchmark folder written here (GenEval: prompts from each metadata.jsonl;
  T2I-CompBench: from the file names; DPG-Bench: its grids, prompts from the `prompts` folder, needed) or of a
  folder of images with same-stem .txt captions."""
  pairs = []
  folders = sorted(glob.glob(os.path.join(out, "[0-9]" * 5, "metadata.jsonl")))
  if folders:
    for meta in folders:
      with open(meta, encoding="utf-8") as f:
        prompt = json.loads(f.read())["prompt"]
      pairs += [(p, prompt) for p in sorted(glob.glob(os.path.join(os.path.dirname(meta), "samples", "*.png")))]
    return pairs
  if os.path.isdir(os.path.join(out, "samples")):
    return [(p, os.path.basename(p)[:-4].rsplit("_", 1)[0])
            for p in sorted(glob.glob(os.path.join(out, "samples", "*.png")))]
  for path in sorted(glob.glob(os.path.join(out, "*"))):
    stem, ext = os.path.splitext(path)
    if ext.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
      continue
    caption = os.path.join(prompts, os.path.basename(stem) + ".txt") if prompts else stem + ".txt"
    if os.path.exists(caption):
      pairs.append((path, " ".join(_read_lines(caption)).strip()))
  if not pairs:
    raise cli.UserError(f"{out}: no benchmark images with prompts found (GenEval NNNNN/ folders, T2I-CompBench "
                        "samples/, or images with same-stem .txt captions; DPG-Bench grids need --prompts). Fix: "
                        "point at such a folder")
  return pairs


def grid_cells(path: str) -> list[np.ndarray]:
  """A benchmark PNG's images: a DPG-Bench grid split back by the settings it records, else the image itself."""
  with Image.open(path) as img:
    image = np.asarray(img.convert("RGB"))
    found = settings_of(path)
  if not found or found.get("benchmark") != "dpg_bench":
    return [image]
  h, w, n = found["height"], found["width"], found["num_images"]
  return [image[(k // 2) * h:(k // 2 + 1) * h, (k % 2) * w:(k % 2 + 1) * w] for k in range(n)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lidit_jax.benchmark", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("benchmark", choices=sorted(READERS))
  parser.add_argument("--prompts", required=True, help="the benchmark's own prompt file (GenEval: "
                      "prompts/evaluation_metadata.jsonl; T2I-CompBench: a category's *_val.txt; DPG-Bench: its "
                      "prompts/ folder of .txt files)")
  parser.add_argument("--model", required=True, help="a training workdir, a diffusers / converted pipeline folder, "
                      "or a config file (configs/x.py[:arg]: its model as a run starts)")
  parser.add_argument("--out", required=True, help="the output folder (created; a previous run's is resumed)")
  parser.add_argument("--num_images", type=int, help="images per prompt (default: GenEval 4, T2I-CompBench 10, "
                      "DPG-Bench 4)")
  parser.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
  parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
  parser.add_argument("--height", type=int, help="image height (default: the model's)")
  parser.add_argument("--width", type=int, help="image width (default: the model's)")
  parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
  parser.add_argument("--batch_size", type=int, help="images per batch over all devices (default: 4 per device)")
  parser.add_argument("--sampler", help="sampler (default: the model's)")
  parser.add_argument("--negative_prompt", help="negative prompt (models that read one)")
  cli.add_debug_flag(parser)
  args = parser.parse_args(argv)
  for name in ("num_images", "steps", "height", "width", "batch_size"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name}={value}: must be at least 1")
  with cli.user_errors():
    distributed.initialize()
    read_items(args.benchmark, args.prompts, args.num_images or DEFAULT_IMAGES[args.benchmark])  # before loading
    outputs.check_apart(args.out, [args.model.partition(":")[0]], allow_inside=True)
    pipe = Pipeline.from_pretrained(args.model, dtype=None)
    result = write(pipe, args.benchmark, args.prompts, args.out, args.num_images, args.steps, args.guidance,
                   args.height, args.width, args.seed, args.batch_size, args.sampler, args.negative_prompt, args.model,
                   progress=sys.stderr.isatty())
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
