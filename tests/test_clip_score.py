"""CLIP score against transformers' CLIPModel + CLIPProcessor (the PIL image backend) on a tiny random CLIP folder the
test saves (model, tokenizer, image processor settings): image embeddings, the preprocessing, the score of image
files + captions by torchmetrics' definition, and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lidit_jax.metrics import __main__ as metrics_main, clip_score  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CAPTIONS = ["a red cube", "two blue balls on the left", "a cat", "the quick brown fox jumps over the lazy dog",
            "green", "x" * 100]  # the last is truncated to 77 tokens (one per letter)
SIZES = [(40, 56), (64, 48), (32, 32), (20, 28), (50, 33), (37, 90)]  # (H, W): wide, tall, exact, upscaled, odd


def _tokenizer():
  """A CLIP tokenizer over single letters (no merges), end-of-text last as in OpenAI's vocabulary."""
  vocab = {}
  for ch in LETTERS:
    vocab[ch] = len(vocab)
    vocab[ch + "</w>"] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  return transformers.CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def save_tiny_clip(path) -> str:
  """A tiny random CLIPModel with its tokenizer and PIL image processor saved at `path` (tests/test_validation.py
  scores with it too)."""
  tok = _tokenizer()
  eos, bos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftext|>")
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                       pad_token_id=eos),
      vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8, hidden_act="gelu"),
      projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():  # well away from the init's near-identity layers, so that every part matters
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  model.save_pretrained(path)
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  transformers.CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(path)
  return str(path)


def _images(folder):
  """PNG files with same-stem captions: RGB noise, one greyscale, one with transparency."""
  rng = np.random.default_rng(1)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i, ((h, w), caption) in enumerate(zip(SIZES, CAPTIONS)):
    pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    image = Image.fromarray(pixels[..., :3])
    if i == 1:
      image = image.convert("L")
    if i == 2:
      image = Image.fromarray(pixels, "RGBA")
    path = os.path.join(folder, f"img{i}.png")
    image.save(path)
    with open(os.path.join(folder, f"img{i}.txt"), "w", encoding="utf-8") as f:
      f.write(caption)
    paths.append(path)
  return paths


def _reference(clip_dir, paths, captions):
  """transformers' pixel values, image features and per-pair 100 * cos."""
  model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
  images = transformers.CLIPImageProcessorPil.from_pretrained(clip_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(clip_dir)
  pixels = images([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
  text = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
  with torch.no_grad():
    img = model.get_image_features(pixel_values=pixels).pooler_output
    txt = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
  cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
  return pixels.numpy(), img.numpy(), 100 * cos.numpy()


@pytest.fixture(scope="module")
def case(clip_dir, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("images"))
  paths = _images(folder)
  return folder, paths, _reference(clip_dir, paths, CAPTIONS)


@pytest.fixture(scope="module")
def scorer(clip_dir):
  return clip_score.CLIPScore(clip_dir, batch_size=4)  # 6 images: two batches, the last padded


def test_preprocessing_and_image_features_match_transformers(scorer, case):
  _, paths, (pixels_NCHW, features, _) = case
  ours = np.stack([scorer.preprocess(clip_score.to_rgb(p)) for p in paths])
  np.testing.assert_allclose(ours, pixels_NCHW.transpose(0, 2, 3, 1), atol=1e-6)
  got = scorer.pixel_features(pixels_NCHW.transpose(0, 2, 3, 1))
  assert got.shape == features.shape == (len(paths), 16)
  assert np.abs(got - features).max() <= 1e-4 * np.abs(features).max()
  np.testing.assert_allclose(scorer.image_features(paths), got, rtol=0, atol=1e-6)


def test_score_is_torchmetrics_definition(scorer, case):
  _, paths, (_, _, cos100) = case
  assert cos100.min() < 0 < cos100.max()  # so that the floor at 0 matters
  want = float(np.mean(np.maximum(cos100, 0)))
  got = scorer.pair_scores(paths, CAPTIONS)
  np.testing.assert_allclose(got, np.maximum(cos100, 0), rtol=0, atol=1e-4 * 100)
  assert abs(scorer(paths, CAPTIONS) - want) <= 1e-4 * max(want, 1.0)
  # in memory (uint8 arrays and floats in [0, 1] as a pipeline returns them) as from the files
  arrays = [clip_score.to_rgb(p) for p in paths]
  assert abs(scorer(arrays, CAPTIONS) - want) <= 1e-4 * max(want, 1.0)
  assert abs(scorer([a / 255.0 for a in arrays], CAPTIONS) - want) <= 1e-4 * max(want, 1.0)
  with pytest.raises(ValueError, match="6 images but 5 captions"):
    scorer(paths, CAPTIONS[:5])


def test_preprocess_reads_hub_style_settings(tmp_path):
  """transformers 4 / the hub's preprocessor_config.json, sizes as plain ints."""
  with open(tmp_path / "preprocessor_config.json", "w") as f:
    json.dump({"crop_size": 32, "size": 36, "do_center_crop": True, "do_normalize": True, "do_resize": True,
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 3}, f)
  pre = clip_score.Preprocess.from_folder(str(tmp_path), 32)
  assert (pre.shortest_edge, pre.crop, pre.mean) == (36, (32, 32), (0.5, 0.5, 0.5))
  assert pre(np.zeros((40, 80, 3), np.uint8)).shape == (32, 32, 3)
  with pytest.raises(ValueError, match="takes 64 x 64"):
    clip_score.Preprocess.from_folder(str(tmp_path), 64)


def test_command_line(clip_dir, case, capsys):
  folder, paths, (_, _, cos100) = case
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "lidit_jax.metrics", "clip_score", folder, "--clip", clip_dir],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1, out.stdout
  result = json.loads(lines[0])
  want = float(np.mean(np.maximum(cos100, 0)))
  assert result["images"] == len(paths)
  assert abs(result["clip_score"] - want) <= 1e-4 * max(want, 1.0)

  with pytest.raises(SystemExit) as exit_:
    metrics_main.main(["clip_score", folder, "--clip", os.path.join(folder, "no_such_clip")])
  assert exit_.value.code == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith("error:") and "no_such_clip" in err[0], err
