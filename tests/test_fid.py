"""FID in JAX against pytorch-fid: our FID Inception's pool3 features equal `pytorch_fid.inception.InceptionV3([3])`'s
(random weights and BatchNorm statistics built by the test, no download) read from a .safetensors and a .pth of its
state dict; our Fréchet distance and .npz statistics equal pytorch-fid's; and `python -m lidit_jax.metrics fid`
end to end on tiny image folders equals pytorch-fid's own pipeline on the same images."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
# pytorch-fid needs torchvision, and the torchvision that pip pairs with this CPU torch cannot load its C ops; installed
# beside transformers it fails every transformers / diffusers model import of the other tests. So it is not in the
# test extra: this file installs the two (no dependencies) into a folder of their own, LIDIT_FID_REFERENCE or a cache
# folder, and puts it on sys.path only while it builds the reference.
REFERENCE = os.environ.get("LIDIT_FID_REFERENCE") or os.path.expanduser("~/.cache/lidit_jax/fid_reference")
PINS = ("pytorch-fid==0.3.0", "torchvision==0.28.0")


def _install_reference():
  if importlib.util.find_spec("pytorch_fid") is not None or os.path.isdir(os.path.join(REFERENCE, "pytorch_fid")):
    return
  staging = f"{REFERENCE}.partial-{os.getpid()}"  # renamed when complete: an interrupted install is not used
  os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
  r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", staging, *PINS],
                     capture_output=True, text=True, timeout=900)
  if r.returncode:
    pytest.fail(f"could not install the FID reference ({' '.join(PINS)}) into {staging}:\n{r.stderr[-2000:]}")
  os.rename(staging, REFERENCE)


_install_reference()

from safetensors.numpy import save_file as save_numpy  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lidit_jax.convert import safetensors_io  # noqa: E402
from lidit_jax.convert.fid_inception import BLOCKS, load_fid_inception  # noqa: E402
from lidit_jax.metrics import fid  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _pytorch_fid_modules():
  """(pytorch_fid.inception, pytorch_fid.fid_score). torchvision's __init__ loads its C ops, which fail beside
  this CPU torch build; pytorch-fid needs only its Python modules (the Inception blocks, ToTensor), so torchvision
  is put in sys.modules as a bare package whose submodules import from its folder. sys.modules and sys.path are
  restored afterwards."""
  ours = lambda k: k == "torchvision" or k.startswith(("torchvision.", "pytorch_fid"))
  saved = {k: v for k, v in sys.modules.items() if ours(k)}
  path = list(sys.path)
  if os.path.isdir(REFERENCE):
    sys.path.insert(0, REFERENCE)
  for k in saved:  # (another test file may have left torchvision as None: "absent")
    del sys.modules[k]
  spec = importlib.util.find_spec("torchvision")
  pkg = types.ModuleType("torchvision")
  pkg.__path__, pkg.__spec__ = [os.path.dirname(spec.origin)], spec
  sys.modules["torchvision"] = pkg
  try:
    import torchvision.version
    pkg.__version__ = torchvision.version.__version__  # pytorch-fid reads it
    from pytorch_fid import fid_score, inception
    yield inception, fid_score
  finally:
    for k in [k for k in sys.modules if ours(k)]:
      del sys.modules[k]
    sys.modules.update(saved)
    sys.path[:] = path


def random_network(inception):
  """pytorch-fid's InceptionV3([3]) (`inception`: its module) with random convs and BatchNorm weights and statistics,
  nothing downloaded (benchmarks/fid_features.py builds it too)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})  # no download; weights set below
    mp.setattr(inception.torchvision.models.inception.Inception3, "load_state_dict", lambda self, sd: None)
    net = inception.InceptionV3([3]).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
      elif isinstance(m, torch.nn.BatchNorm2d):
        for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2), (m.running_mean, -0.2, 0.2),
                          (m.running_var, 0.5, 1.5)):
          t.uniform_(lo, hi, generator=g)
  return net


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """pytorch-fid's InceptionV3([3]) with random convs and BatchNorms (so a wrong epsilon or a skipped norm shows),
  its state dict saved as .safetensors and .pth, and pytorch-fid's modules."""
  tmp = tmp_path_factory.mktemp("fid_weights")
  torch.set_num_threads(2)
  with _pytorch_fid_modules() as (inception, fid_score):
    net = random_network(inception)
    sd = net.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "inception.safetensors"))
    torch.save(sd, tmp / "inception.pth")
    yield types.SimpleNamespace(net=net, sd=sd, fid_score=fid_score, st=str(tmp / "inception.safetensors"),
                                pth=str(tmp / "inception.pth"))


def _torch_features(net, images_BHWC: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return net(torch.from_numpy(images_BHWC).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()


def test_features_match_pytorch_fid(reference):
  """Upscaled (64 x 80) and downscaled (320 x 300) inputs through the in-network resize, from both files."""
  rng = np.random.default_rng(0)
  batches = [rng.uniform(0, 1, (2, 64, 80, 3)).astype(np.float32), rng.uniform(0, 1, (1, 320, 300, 3)).astype(np.float32)]
  module, params = load_fid_inception(reference.st)
  _, from_pth = load_fid_inception(reference.pth, allow_pickle=True)
  jax.tree.map(np.testing.assert_array_equal, from_pth, params)
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x))
  for x in batches:
    want = _torch_features(reference.net, x)
    got = np.asarray(apply(params, x))
    assert got.shape == (len(x), 2048) and got.dtype == np.float32
    scale = np.abs(want).max()
    assert scale > 1 and np.abs(got - want).max() / scale < 1e-4, np.abs(got - want).max() / scale


def test_weight_file_namings_and_refusals(reference, tmp_path):
  """The released file's naming (torchvision's attribute names + its unused fc) reads the same parameters; a pickle
  needs consent; a tensor of another network, or one missing, is named."""
  _, want = load_fid_inception(reference.st)
  names = {f"blocks.{i}.{j}.": f"{n}." for i, block in enumerate(BLOCKS) for j, n in enumerate(block)}
  bare = {re.sub(r"^blocks\.\d+\.\d+\.", lambda m: names[m.group(0)], k): v.numpy() for k, v in reference.sd.items()}
  bare.update({"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32)})
  save_numpy(bare, str(tmp_path / "released.safetensors"))
  _, got = load_fid_inception(str(tmp_path / "released.safetensors"))
  jax.tree.map(np.testing.assert_array_equal, got, want)

  with pytest.raises(ValueError, match="allow_pickle"):
    load_fid_inception(reference.pth)
  save_numpy({**bare, "AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)}, str(tmp_path / "aux.safetensors"))
  with pytest.raises(safetensors_io.ConversionError, match="AuxLogits.fc.weight"):
    load_fid_inception(str(tmp_path / "aux.safetensors"))
  del bare["Mixed_6c.branch_pool.bn.running_var"]
  save_numpy(bare, str(tmp_path / "short.safetensors"))
  with pytest.raises(safetensors_io.ConversionError, match=r"missing Mixed_6c\.branch_pool\.bn\.running_var"):
    load_fid_inception(str(tmp_path / "short.safetensors"))


def test_frechet_distance_and_statistics_match_pytorch_fid(reference, tmp_path):
  rng = np.random.default_rng(1)
  for n, d in ((40, 6), (4, 6)):  # full-rank covariances, and rank-deficient ones (fewer images than dimensions)
    a, b = rng.normal(size=(n, d)), 1.5 * rng.normal(size=(n, d)) + 0.3
    stats = (*fid.statistics(a), *fid.statistics(b))
    want = reference.fid_score.calculate_frechet_distance(*stats)
    assert fid.frechet_distance(*stats) == pytest.approx(want, rel=1e-12, abs=1e-12) and want > 0.1
  mu, sigma = fid.statistics(a)
  np.testing.assert_array_equal(mu, np.mean(a, axis=0))
  np.testing.assert_array_equal(sigma, np.cov(a, rowvar=False))
  path = str(tmp_path / "a.npz")
  fid.save_statistics(path, mu, sigma)
  with np.load(path) as f:
    assert sorted(f.files) == ["mu", "sigma"]
  m, s = reference.fid_score.compute_statistics_of_path(path, None, 1, 2048, "cpu")  # pytorch-fid reads ours
  np.testing.assert_array_equal(m, mu)
  np.testing.assert_array_equal(s, sigma)
  with pytest.raises(OSError, match="--overwrite"):
    fid.save_statistics(path, mu, sigma)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary file left


def test_frechet_distance_from_features_is_exact_at_any_image_count(reference):
  """The low-rank form (training's) equals pytorch-fid's where that is defined, and the exact value (the trace of
  the PSD root of S_a^1/2 S_b S_a^1/2, by eigendecomposition) where scipy's sqrtm has no real root."""
  rng = np.random.default_rng(2)
  for n, d in ((40, 6), (5, 64)):
    a, b = rng.normal(size=(n, d)) * 3, rng.normal(size=(n + 7, d)) + 0.5
    (mu_a, sig_a), (mu_b, sig_b) = fid.statistics(a), fid.statistics(b)
    w, v = np.linalg.eigh(sig_a)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    e = np.linalg.eigvalsh(half @ sig_b @ half)
    e = np.where(e > e.max() * 1e-12, e, 0.0)  # S_a's null space: exact zeros, not their rounding noise
    exact = np.sum((mu_a - mu_b) ** 2) + np.trace(sig_a) + np.trace(sig_b) - 2 * np.sqrt(e).sum()
    got = fid.frechet_distance_from_features(a, mu_b, sig_b)
    assert got == pytest.approx(exact, rel=1e-9) and got > 1
    if n > d:
      assert got == pytest.approx(reference.fid_score.calculate_frechet_distance(mu_a, sig_a, mu_b, sig_b), rel=1e-9)


def _metrics(*args, env=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "lidit_jax.metrics", *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _write_images(folder: pathlib.Path, images) -> list[str]:
  folder.mkdir(exist_ok=True)
  for i, pixels in enumerate(images):
    Image.fromarray(pixels).save(folder / f"{i}.png")
  return [str(folder / f"{i}.png") for i in range(len(images))]


def _distinct_images(sizes, seed: int) -> list[np.ndarray]:
  """uint8 images that differ in kind (stripes of different frequencies and colours, plus noise), so their features
  differ by more than noise images' would."""
  rng = np.random.default_rng(seed)
  out = []
  for i, (h, w) in enumerate(sizes):
    yy, xx = np.mgrid[:h, :w]
    colour = rng.uniform(0, 1, 3)
    stripes = 0.5 + 0.5 * np.sin((xx * (i + 1) + yy * (2 - i)) * 0.3)[..., None] * colour
    out.append(np.clip(255 * (stripes + 0.1 * rng.normal(size=(h, w, 3))), 0, 255).astype(np.uint8))
  return out


def _exact_fid(fa: np.ndarray, fb: np.ndarray) -> float:
  """The FID of two small feature sets in closed form: tr sqrt(S_a S_b) is the nuclear norm of Xa Xb^T / sqrt((n_a -
  1)(n_b - 1)) (X: centred features), which needs no 2048 x 2048 matrix square root."""
  xa, xb = fa - fa.mean(0), fb - fb.mean(0)
  d = fa.mean(0) - fb.mean(0)
  nuclear = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt((len(fa) - 1) * (len(fb) - 1))
  return float(d @ d + np.trace(np.cov(fa, rowvar=False)) + np.trace(np.cov(fb, rowvar=False)) - 2 * nuclear)


def test_cli_matches_pytorch_fid(reference, tmp_path):
  """A: three images (one of an odd size, resized on the host) and a corrupt file; B: the same three images, two of
  them twice. Fewer images than the 2048 feature dimensions make rank-deficient covariances, whose product has no
  square root unless both span one subspace (pytorch-fid's sqrtm then reports a huge imaginary part); the same
  images in other proportions span the same one, and still differ in mean and covariance."""
  images = _distinct_images([(64, 80), (64, 80), (40, 48)], seed=2)
  a_files = _write_images(tmp_path / "a", images)
  _write_images(tmp_path / "b", [images[i] for i in (0, 0, 1, 2, 2)])
  (tmp_path / "a" / "9_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  # pytorch-fid's own loader and network, one image per batch (its DataLoader stacks a batch: one size only)
  feats = reference.fid_score.get_activations(a_files, reference.net, batch_size=1, device="cpu", num_workers=0)
  ref_a, ref_b = feats, feats[[0, 0, 1, 2, 2]]
  # pytorch-fid's sqrtm of the 2048 x 2048 product takes ~35 s on 2 cores (the CLI pays it once); the closed form
  # is the exact value, 5e-5 from sqrtm's rounding here. Our distance equals pytorch-fid's function: test above.
  want = _exact_fid(ref_a, ref_b)

  r = _metrics("fid", str(tmp_path / "a"), str(tmp_path / "b"), "--inception", reference.st, "--batch_size", "1",
               "--save_stats", str(tmp_path / "a.npz"), "--no_progress")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 1, r.stdout
  out = json.loads(lines[0])
  assert (out["images_a"], out["skipped_a"], out["images_b"], out["skipped_b"]) == (3, 1, 5, 0)
  assert "skipped 1 unreadable image" in r.stderr and "9_corrupt.png" in r.stderr
  assert out["fid"] == pytest.approx(want, rel=3e-4) and want > 1
  with np.load(tmp_path / "a.npz") as f:  # pytorch-fid's statistics of A
    scale = np.abs(ref_a).max()
    np.testing.assert_allclose(f["mu"], ref_a.mean(0), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(f["sigma"], np.cov(ref_a, rowvar=False), rtol=0, atol=1e-5 * scale ** 2)

  # statistics files as inputs (no network needed); small ones, so the distance is quick
  rng = np.random.default_rng(4)
  for name, shift in (("x", 0.0), ("y", 0.5)):
    fid.save_statistics(str(tmp_path / f"{name}.npz"), *fid.statistics(rng.normal(size=(20, 5)) + shift))
  r = _metrics("fid", str(tmp_path / "x.npz"), str(tmp_path / "y.npz"))
  assert r.returncode == 0, r.stderr[-3000:]
  stats = [reference.fid_score.compute_statistics_of_path(str(tmp_path / f"{n}.npz"), None, 1, 5, "cpu") for n in "xy"]
  want = reference.fid_score.calculate_frechet_distance(*stats[0], *stats[1])
  assert json.loads(r.stdout)["fid"] == pytest.approx(want, rel=1e-12) and want > 0.5

  # a pickle without consent: one error line, exit status 2, nothing run
  r = _metrics("fid", str(tmp_path / "a"), str(tmp_path / "b"), "--inception", reference.pth)
  assert r.returncode == 2 and r.stdout == ""
  assert len(r.stderr.strip().splitlines()) == 1 and "--allow-pickle" in r.stderr and "Traceback" not in r.stderr


def test_cli_save_stats_alone_and_clean_resize(reference, tmp_path, capsys):
  """`fid A --save_stats OUT` writes A's statistics and no distance; --resize clean feeds clean-fid's host resize
  (per-channel PIL bicubic of the float image in [0, 255]) and the TF graph's (x - 128) / 128 to the network."""
  files = _write_images(tmp_path / "a", _distinct_images([(30, 40), (30, 40)], seed=5))
  args = argparse.Namespace(a=str(tmp_path / "a"), b=None, inception=reference.st, allow_pickle=False,
                            batch_size=4, resize="clean", save_stats=str(tmp_path / "a.npz"), overwrite=False,
                            no_progress=True)
  out = fid.run(args)
  assert "fid" not in out and out["images_a"] == 2 and out["saved"] == args.save_stats
  x = np.stack([fid.clean_resize(np.asarray(Image.open(f).convert("RGB"))) for f in files])
  with torch.no_grad():  # pytorch-fid's network, told to skip its resize, on clean-fid's input
    reference.net.resize_input, reference.net.normalize_input = False, False
    try:
      want = reference.net(torch.from_numpy((x - 128) / 128).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
    finally:
      reference.net.resize_input, reference.net.normalize_input = True, True
  with np.load(args.save_stats) as f:
    np.testing.assert_allclose(f["mu"], want.astype(np.float64).mean(0), rtol=0, atol=1e-4 * np.abs(want).max())
  assert x.shape == (2, 299, 299, 3) and 0 <= x.min() and x.max() <= 255
