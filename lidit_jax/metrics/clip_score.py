"""CLIP score in JAX, as torchmetrics defines it: for each (image, caption) pair 100 * max(cos(E_I, E_C), 0), with
E_I / E_C the CLIP model's projected image / text embeddings, averaged over the pairs.

  python -m lidit_jax.metrics clip_score DIR --clip CLIP_DIR [--prompts PATH] [--batch_size 32]

DIR: a benchmark folder written by `python -m lidit_jax.benchmark` (GenEval, T2I-CompBench; DPG-Bench grids, each
cell scored with its prompt, need --prompts) or a folder of images with same-stem .txt captions.
CLIP_DIR: a Hugging Face CLIP folder (a CLIPModel save: config.json, model.safetensors, tokenizer files and the
image processor's settings), converted on load. Images are preprocessed on the host as transformers'
CLIPImageProcessor does with the PIL backend (`Preprocess`); captions are tokenized with the folder's tokenizer,
truncated and padded to the text tower's positions (77). From Python, `CLIPScore(clip_dir)` loads once and scores
many batches (validation during training); `clip_score(images, captions, clip_dir)` is the one-off.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from PIL import Image
from tqdm import tqdm

from lidit_jax import benchmark
from lidit_jax.convert import hf_clip, hf_text, safetensors_io as io

# CLIPImageProcessor's defaults (OpenAI's statistics); the sizes default to the model's image size
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL's number, as processor configs store `resample`
SETTINGS_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4 saves / transformers 5 saves


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """CLIPImageProcessor's steps on one RGB uint8 image: resize (the shortest side to `shortest_edge`, the other
  scaled and truncated to an int, or to exactly `resize_to`), center crop to `crop` (zero padding where the image
  is smaller), rescale, normalize. The resize is PIL's, on uint8, as the PIL backend (transformers 5's
  CLIPImageProcessorPil, transformers 4's CLIPImageProcessor) does."""
  shortest_edge: int | None = 224
  resize_to: tuple[int, int] | None = None  # (height, width)
  crop: tuple[int, int] | None = (224, 224)  # (height, width); None: no center crop
  resample: int = BICUBIC
  rescale: float | None = 1 / 255
  mean: tuple[float, ...] | None = OPENAI_MEAN  # None: no normalization
  std: tuple[float, ...] | None = OPENAI_STD

  @classmethod
  def from_folder(cls, clip_dir: str, image_size: int) -> "Preprocess":
    """The settings a CLIP folder saves for its image processor, or the processor's defaults at `image_size`."""
    settings, where = {}, f"{clip_dir} (no {' / '.join(SETTINGS_FILES)}: CLIPImageProcessor's defaults)"
    for name in SETTINGS_FILES:
      path = os.path.join(clip_dir, name)
      if os.path.isfile(path):
        settings, where = io.read_json(path), path
        settings = settings.get("image_processor", settings)  # processor_config.json nests it
        break

    def get(key, default):
      value = settings.get(key)
      return default if value is None else value

    size = get("size", image_size)
    size = {"shortest_edge": size} if isinstance(size, int) else size  # old configs: CLIP never resizes to square
    if set(size) == {"shortest_edge"}:
      shortest, resize_to = int(size["shortest_edge"]), None
    elif set(size) == {"height", "width"}:
      shortest, resize_to = None, (int(size["height"]), int(size["width"]))
    else:
      raise ValueError(f"{where}: image processor size={size} is not supported; supported: {{'shortest_edge': N}} "
                       "or {'height': H, 'width': W}. Fix: use one of those")
    crop = get("crop_size", image_size)
    crop = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
    out = cls(shortest_edge=shortest if get("do_resize", True) else None,
              resize_to=resize_to if get("do_resize", True) else None,
              crop=crop if get("do_center_crop", True) else None, resample=int(get("resample", BICUBIC)),
              rescale=float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else None,
              mean=tuple(get("image_mean", OPENAI_MEAN)) if get("do_normalize", True) else None,
              std=tuple(get("image_std", OPENAI_STD)) if get("do_normalize", True) else None)
    final = out.crop or out.resize_to
    if final != (image_size, image_size):
      raise ValueError(f"{where}: the image processor makes {final or 'images of any size'} (H, W), but the CLIP "
                       f"image tower takes {image_size} x {image_size}. Fix: a crop_size (or size) of {image_size}")
    return out

  def __call__(self, image_HWC: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 pixels [crop H, crop W, 3]."""
    h, w = image_HWC.shape[:2]
    if self.shortest_edge or self.resize_to:
      if self.resize_to:
        new_h, new_w = self.resize_to
      else:  # transformers' get_resize_output_image_size: the long side int()-truncated
        short, long = sorted((h, w))
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
      resample = Image.Resampling(self.resample)
      image_HWC = np.asarray(Image.fromarray(image_HWC).resize((new_w, new_h), resample=resample))
    if self.crop:
      image_HWC = _center_crop(image_HWC, *self.crop)
    x = image_HWC.astype(np.float32)
    if self.rescale is not None:
      x = (image_HWC.astype(np.float64) * self.rescale).astype(np.float32)  # as the reference rounds
    if self.mean is not None:
      x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return x


def _center_crop(x_HWC: np.ndarray, height: int, width: int) -> np.ndarray:
  h, w = x_HWC.shape[:2]
  if h < height or w < width:  # zero padding, the odd pixel after, as the PIL backend pads
    top, left = max(height - h + 1, 0) // 2, max(width - w + 1, 0) // 2
    padded = np.zeros((max(h, height), max(w, width), x_HWC.shape[2]), x_HWC.dtype)
    padded[top:top + h, left:left + w] = x_HWC
    x_HWC, h, w = padded, *padded.shape[:2]
  top, left = (h - height) // 2, (w - width) // 2
  return x_HWC[top:top + height, left:left + width]


def to_rgb(image) -> np.ndarray:
  """A path, PIL image or array (uint8, or float in [0, 1]; [H, W], [H, W, 1 | 3 | 4]) -> uint8 RGB [H, W, 3].
  Transparency is composited on white, as transformers' convert_to_rgb does; floats are rounded as the PNGs
  written by lidit_jax are (so scoring an in-memory batch equals scoring the files)."""
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as img:
      return to_rgb(img)
  if isinstance(image, Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      white = Image.new("RGBA", image.size, (255, 255, 255, 255))
      image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))
  x = np.asarray(image)
  if x.dtype != np.uint8:
    x = np.clip(np.round(x.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
  if x.ndim == 2 or x.shape[-1] == 1:
    x = np.repeat(x.reshape(*x.shape[:2], 1), 3, axis=-1)
  if x.ndim != 3 or x.shape[-1] not in (3, 4):
    raise ValueError(f"an image of shape {x.shape}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
  return to_rgb(Image.fromarray(x)) if x.shape[-1] == 4 else x


def _normalized(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPScore:
  """A CLIP folder loaded once (both towers converted to Flax, jitted): `scorer(images, captions)` is the CLIP
  score of the pairs; `pair_scores`, `image_features`, `text_features` the parts. `images`: paths, PIL images, or
  arrays (one [N, H, W, C] batch or a list; uint8 or float in [0, 1]). Batches of `batch_size` (the last padded)."""

  def __init__(self, clip_dir: str, batch_size: int = 32, dtype=jnp.float32):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}; it must be at least 1")
    clip_dir = os.path.expanduser(os.fspath(clip_dir))
    if not os.path.isdir(clip_dir):
      raise FileNotFoundError(f"CLIP folder {clip_dir!r} is not a directory. Fix: point at a local Hugging Face CLIP "
                              "model folder (config.json, model.safetensors, tokenizer, preprocessor_config.json), "
                              "e.g. a download of openai/clip-vit-large-patch14")
    config = os.path.join(clip_dir, "config.json")
    model_type = io.read_json(config).get("model_type") if os.path.isfile(config) else None
    if model_type != "clip":
      raise ValueError(f"{config}: {'model_type=' + repr(model_type) if model_type else 'missing'}; CLIP score needs "
                       "both towers of a Hugging Face CLIPModel (model_type 'clip'). Fix: point at a full CLIP model "
                       "folder")
    self.batch_size = batch_size
    self.vision, vision_params = hf_clip.load_vision(clip_dir, dtype)
    self.text, text_params = hf_text.load_hf_text_model(clip_dir, dtype,
                                                        adapt=lambda cfg: hf_clip.with_head(cfg, projection=True))
    try:
      self.tokenizer = transformers.AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError / TypeError for what is missing
      raise OSError(f"cannot load the tokenizer of {clip_dir}: {type(e).__name__}: {e}. Fix: the CLIP folder needs "
                    "its tokenizer files (tokenizer.json or vocab.json + merges.txt)") from e
    self.preprocess = Preprocess.from_folder(clip_dir, self.vision.cfg.image_size)
    self.max_length = self.text.cfg.max_positions
    vision, text = self.vision, self.text
    # params as arguments, not closed over: a closed-over array is compiled into the executable as a constant
    vision_fn = jax.jit(lambda p, x: vision.apply({"params": p}, x)[1].astype(jnp.float32))
    text_fn = jax.jit(lambda p, ids, mask: text.apply({"params": p}, ids, mask)[2].astype(jnp.float32))
    self._pixels_fn = lambda x: vision_fn(vision_params, x)
    self._text_fn = lambda ids, mask: text_fn(text_params, ids, mask)
    self._pool = concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))  # PIL decodes without the GIL

  def _batched(self, fn, arrays: Sequence[np.ndarray], n: int, progress: bool, what: str) -> np.ndarray:
    """fn over fixed-size batches (one compilation); each dispatch runs while the host prepares the next batch."""
    outs = []
    for start in tqdm(range(0, n, self.batch_size), desc=what, unit="batch", disable=not progress):
      batch = [a[start:start + self.batch_size] for a in arrays]
      pad = self.batch_size - len(batch[0])
      batch = [np.concatenate([b, np.repeat(b[-1:], pad, axis=0)]) if pad else b for b in batch]
      outs.append(fn(*batch)[:self.batch_size - pad])
    return np.concatenate([np.asarray(o) for o in outs]) if outs else np.zeros((0, 0), np.float32)

  def pixel_features(self, pixels_NHWC: np.ndarray) -> np.ndarray:
    """Projected image embeddings [N, P] of preprocessed pixels (CLIPModel.get_image_features)."""
    return self._batched(self._pixels_fn, [np.asarray(pixels_NHWC, np.float32)], len(pixels_NHWC), False, "images")

  def image_features(self, images, progress: bool = False) -> np.ndarray:
    """Projected image embeddings [N, P] of images (see the class), preprocessed batch by batch."""
    images = list(images)
    outs = []
    for start in tqdm(range(0, len(images), self.batch_size), desc="clip images", unit="batch",
                      disable=not progress):
      chunk = images[start:start + self.batch_size]
      pixels = np.stack(list(self._pool.map(lambda im: self.preprocess(to_rgb(im)), chunk)))
      pad = self.batch_size - len(chunk)
      if pad:
        pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), pixels.dtype)])
      outs.append(self._pixels_fn(pixels)[:len(chunk)])  # async: the next chunk decodes meanwhile
    return np.concatenate([np.asarray(o) for o in outs])

  def text_features(self, captions: Sequence[str], progress: bool = False) -> np.ndarray:
    """Projected text embeddings [N, P] (CLIPModel.get_text_features), captions truncated to the tower's length."""
    enc = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    return self._batched(self._text_fn, [ids, mask], len(ids), progress, "clip captions")

  def pair_scores(self, images, captions: Sequence[str], progress: bool = False) -> np.ndarray:
    """100 * max(cos(image, caption), 0) for each pair [N]."""
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
      raise ValueError(f"{len(images)} images but {len(captions)} captions; CLIP score needs one caption per image")
    if not captions:
      raise ValueError("no images to score")
    cos = np.sum(np.asarray(_normalized(self.image_features(images, progress))) *
                 np.asarray(_normalized(self.text_features(captions, progress))), axis=-1)
    return 100.0 * np.maximum(cos, 0.0)

  def __call__(self, images, captions: Sequence[str]) -> float:
    return float(np.mean(self.pair_scores(images, captions)))


def clip_score(images, captions: Sequence[str], clip_dir: str, batch_size: int = 32) -> float:
  """The CLIP score of (image, caption) pairs with the CLIP folder `clip_dir`; `CLIPScore` to score many times."""
  return CLIPScore(clip_dir, batch_size)(images, captions)


def folder_pairs(folder: str, prompts: str | None = None) -> tuple[list, list[str]]:
  """(images, captions) of a benchmark folder or a folder of images with .txt captions: paths, or for DPG-Bench
  grids their cells (each scored with the grid's prompt)."""
  folder = os.path.expanduser(os.fspath(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder!r} is not a directory. Fix: point at a benchmark folder written by "
                            "`python -m lidit_jax.benchmark`, or a folder of images with same-stem .txt captions")
  images, captions = [], []
  for path, prompt in benchmark.images_and_prompts(folder, prompts):
    settings = benchmark.settings_of(path) if path.lower().endswith(".png") else None
    cells = benchmark.grid_cells(path) if settings and settings.get("benchmark") == "dpg_bench" else [path]
    images += cells
    captions += [prompt] * len(cells)
  return images, captions


def run(args) -> dict:
  images, captions = folder_pairs(args.dir, args.prompts)
  scorer = CLIPScore(args.clip, args.batch_size)
  scores = scorer.pair_scores(images, captions, progress=True)
  return {"clip_score": float(np.mean(scores)), "images": len(scores), "clip": args.clip}


def add_parser(subparsers):
  p = subparsers.add_parser("clip_score", help="CLIP score of a benchmark folder's images and prompts",
                            description=__doc__.split("\n\n")[0])
  p.add_argument("dir", metavar="DIR", help="a benchmark folder, or images with same-stem .txt captions")
  p.add_argument("--clip", required=True, metavar="CLIP_DIR", help="a Hugging Face CLIP model folder")
  p.add_argument("--prompts", default=None, metavar="PATH",
                 help="where the prompts are when DIR does not hold them (DPG-Bench's prompt folder)")
  p.add_argument("--batch_size", type=int, default=32, help="images per jitted batch (default 32)")
  p.set_defaults(run=run)
