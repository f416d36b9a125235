"""LoRA's factors live in each kernel's PyTorch view (lidit_jax/lora.py): B = 0 leaves the model as it is, and a
merged kernel, exported as PyTorch reads it (`export.torch_layout`), is the base weight + (alpha / r) B @ A: for the
DiT's kernels (attention heads split, scanned stacks) and the U-Net's convolutions (LoCon)."""
import jax
import numpy as np
import pytest

from lidit_jax import configs, export, lora, state

from conftest import ROOT

ALPHA, RANK, CONV_RANK = 4.0, 2, 3


def flat(tree) -> dict:
  return {tuple(k.key for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("variant, patterns, conv", [
    ("tiny", [r"denoiser/blocks/block/(self_attn|cross_attn|mlp)/"], False),
    ("tiny,unet", [r"denoiser/.*(to_q|to_out_0|proj_in|conv1|conv_in)/"], True),
])
def test_merged_kernels_are_the_base_plus_the_factors_product_in_torch_layout(variant, patterns, conv):
  config = configs.validate(configs.load_config_file(f"{ROOT / 'configs' / 'shapes.py'}:{variant}"))
  params = state.setup(config).init_params(jax.random.key(0))
  names = export.model_axis_names(config)
  kernels = lora.targets(names, patterns)
  base = flat(params)
  assert kernels and all(p[-1] == "kernel" for p in kernels)
  assert any(n[0] == "layers" for n in kernels.values()) != conv  # the DiT's blocks are a scanned stack
  assert any(n[:2] == (None, None) for n in kernels.values()) == conv  # the U-Net's convolutions: LoCon
  factors = lora.init(jax.random.key(1), kernels, {p: base[p].shape for p in kernels}, RANK, CONV_RANK)
  assert len(lora.pairs(factors)) == len(kernels)

  # B = 0: the base model, bit for bit
  same = flat(lora.merge(params, factors, kernels, ALPHA))
  assert all(np.array_equal(same[p], base[p]) for p in base)

  rng = np.random.default_rng(2)
  factors = jax.tree_util.tree_map_with_path(
      lambda p, f: rng.normal(size=f.shape).astype(np.float32) if p[-1].key == "B" else f, factors)
  pairs = lora.pairs(factors)
  merged = flat(jax.jit(lambda p, f: lora.merge(p, f, kernels, ALPHA))(params, factors))
  assert all(np.array_equal(merged[p], base[p]) for p in base if p not in kernels)  # the others untouched
  # torch's view is [out, in] (OIHW): an attention output's heads are its input, split ([H, K, D]: the DiT) or
  # already flat ([H*K, D]: the U-Net)
  out_kernel = next(p for p in kernels if p[-2] in ("out", "to_out_0"))
  *_, heads, width = base[out_kernel].shape
  assert pairs[out_kernel]["B"].shape[-2] == width
  assert pairs[out_kernel]["A"].shape[-1] == base[out_kernel][..., 0].size // (
      base[out_kernel].shape[0] if kernels[out_kernel][0] == "layers" else 1)
  for path, n in kernels.items():
    f = pairs[path]
    a, b = np.asarray(f["A"]), np.asarray(f["B"])
    if n[0] != "layers":
      a, b = a[None], b[None]
    want_base, got = export.torch_layout(n, base[path], path), export.torch_layout(n, merged[path], path)
    assert len(got) == len(a)  # a stack is exported per layer, each with its own pair
    for (key, w), a1, b1 in zip(got.items(), a, b):
      r = a1.shape[0]
      product = np.einsum("or,rikl->oikl", b1[:, :, 0, 0], a1) if a1.ndim == 4 else b1 @ a1
      assert r == (CONV_RANK if a1.ndim == 4 else RANK)
      np.testing.assert_allclose(w - want_base[key], ALPHA / r * product, rtol=1e-4, atol=1e-5, err_msg=key)


def test_convolutions_take_no_factors_without_a_conv_rank():
  config = configs.validate(configs.load_config_file(f"{ROOT / 'configs' / 'shapes.py'}:tiny,unet"))
  abstract = state.setup(config, abstract=True).abstract_state.params
  shapes = {tuple(k.key for k in p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  kernels = lora.targets(export.model_axis_names(config), [r"denoiser/"])
  convs = {p for p in kernels if len(shapes[p]) == 4}
  factors = lora.pairs(lora.init(jax.random.key(0), kernels, shapes, RANK, conv_rank=0))
  assert convs and factors and not convs & set(factors)
  assert set(factors) == set(kernels) - convs
