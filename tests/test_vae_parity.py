"""diffusers' AutoencoderKL against ours (models/vae.py via convert.load_vae), float32, tiny random models the
test builds and saves: SD-style (4 latent channels, quant convs, mid attention) and SD3 / Flux-style (16 channels,
no quant convs), any block count and layers per block, with and without mid-block attention."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from lidit_jax.convert import load_vae  # noqa: E402

LAYOUTS = {
    "sd": dict(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8),
    "flux": dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
                 use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
    "no_mid_attention": dict(block_out_channels=(8, 16, 16, 32), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, mid_block_add_attention=False),
}


def _save(tmp_path, name, **kw):
  n = len(kw["block_out_channels"])
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                **kw).eval()
  with torch.no_grad():  # random norms and biases too, so a swapped scale / bias or a wrong epsilon shows
    for p_name, p in ref.named_parameters():
      if "norm" in p_name:
        p.copy_(1 + 0.5 * torch.randn_like(p) if p_name.endswith("weight") else 0.5 * torch.randn_like(p))
      elif p_name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  ref.save_pretrained(tmp_path / name)
  return ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_encode_and_decode_match_diffusers(tmp_path, layout):
  ref = _save(tmp_path, layout, **LAYOUTS[layout])
  module, params = load_vae(str(tmp_path / layout), dtype=jnp.float32)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  x[1] *= 1e-2  # a nearly flat image: small group variances, where GroupNorm's epsilon (1e-6) shows
  f = 2 ** (len(LAYOUTS[layout]["block_out_channels"]) - 1)
  z = rng.normal(size=(2, 32 // f, 32 // f, module.cfg.latent_channels)).astype(np.float32)
  # The reference runs in float64: on the flat image torch's own float32 is 3.7e-4 from it (flux layout, two
  # channels per norm group) and ours 1.9e-5.
  ref = ref.double()
  with torch.no_grad():
    want_mean = ref.encode(torch.from_numpy(x).double().permute(0, 3, 1, 2)).latent_dist.mean.permute(0, 2, 3, 1).numpy()
    want_img = ref.decode(torch.from_numpy(z).double().permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  got_mean = np.asarray(module.apply({"params": params}, jnp.asarray(x), method="encode"))
  got_img = np.asarray(module.apply({"params": params}, jnp.asarray(z), method="decode"))
  assert got_mean.shape == want_mean.shape and got_img.shape == want_img.shape
  np.testing.assert_allclose(got_mean, want_mean, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got_img, want_img, atol=1e-4, rtol=1e-4)
  assert np.abs(want_img).max() > 0.1 and np.abs(want_mean).max() > 0.1  # not a degenerate comparison
  cfg = json.loads((tmp_path / layout / "config.json").read_text())
  assert module.cfg.scaling_factor == pytest.approx(cfg["scaling_factor"])
  assert module.cfg.shift_factor == (None if cfg.get("shift_factor") is None else pytest.approx(cfg["shift_factor"]))


def test_old_attention_names_pipeline_folder_and_bf16(tmp_path):
  """Older diffusers saves (mid-block attention as query / key / value / proj_attn) inside a pipeline folder's
  vae/ load to the same model; bfloat16 decoding stays within 5e-2 of float32 (measured 2.1e-2 of the largest output)."""
  from safetensors.numpy import load_file, save_file
  ref = _save(tmp_path, "vae", **LAYOUTS["sd"])
  new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  pipe = tmp_path / "pipe" / "vae"
  pipe.mkdir(parents=True)
  tensors = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
  renamed = {}
  for k, v in tensors.items():
    for a, b in new.items():
      k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
    renamed[k] = v
  assert any(".proj_attn." in k for k in renamed)
  save_file(renamed, str(pipe / "diffusion_pytorch_model.safetensors"))
  (pipe / "config.json").write_text((tmp_path / "vae" / "config.json").read_text())
  module, params = load_vae(str(tmp_path / "pipe"))
  z = np.random.default_rng(1).normal(size=(1, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    want = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  got = np.asarray(module.apply({"params": params}, jnp.asarray(z), method="decode"))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  module16, params16 = load_vae(str(tmp_path / "vae"), dtype=jnp.bfloat16)
  got16 = np.asarray(module16.apply({"params": params16}, jnp.asarray(z), method="decode"), np.float32)
  err = np.abs(got16 - want).max() / np.abs(want).max()
  print(f"bf16 decode, max error over max |output|: {err:.2e}")
  assert 1e-4 < err < 5e-2, err  # bf16 really ran (not float32), and stays close


def test_refuses_weights_of_another_layout(tmp_path):
  _save(tmp_path, "vae", **LAYOUTS["sd"])
  cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
  cfg["layers_per_block"] = 1
  (tmp_path / "other.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="match no parameter|shape"):
    load_vae(str(tmp_path / "vae"), config=str(tmp_path / "other.json"))
  with pytest.raises(Exception, match="not a directory"):
    load_vae(str(tmp_path / "nowhere"))


def _write_original(ref, path, prefix, extra=()):
  """The reference's weights as an original (CompVis LDM / A1111) single file: renamed, the mid-block attention
  as 1x1 convs. diffusers' own single-file reader checks the file below, so the test's renaming is not ours alone."""
  from safetensors.torch import save_file
  from lidit_jax.convert.diffusers_vae import ldm_name
  n = len(ref.config.block_out_channels)
  sd = {}
  for k, v in ref.state_dict().items():
    name = ldm_name(k, n)
    sd[prefix + name] = (v[:, :, None, None] if ".attn_1." in name and v.ndim == 2 else v).contiguous()
  sd.update({k: torch.zeros(2, 2) for k in extra})
  save_file(sd, str(path))


@pytest.mark.parametrize("kind", ["sd_checkpoint_with_config", "bare_vae_inferred"])
def test_original_single_files(tmp_path, kind):
  """A whole SD checkpoint (`first_stage_model.*` among U-Net keys; config.json given) and a bare VAE file
  (`encoder.*` / `decoder.*`; the layout inferred from the shapes) give diffusers' model."""
  layout = (LAYOUTS["sd"] if kind.startswith("sd") else
            dict(block_out_channels=(32, 32, 64), layers_per_block=1, latent_channels=4))  # 32 groups: SD's
  ref = _save(tmp_path, "vae", **layout)
  file = tmp_path / "model.safetensors"
  prefix, extra = ("first_stage_model.", ["model.diffusion_model.out.0.weight"]) if kind.startswith("sd") else ("", [])
  _write_original(ref, file, prefix, extra)
  config = str(tmp_path / "vae" / "config.json") if kind.startswith("sd") else None
  x = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32))
  with torch.no_grad():
    want = ref.encode(x).latent_dist.mean
    check = diffusers.AutoencoderKL.from_single_file(str(file), config=str(tmp_path / "vae")).encode(x).latent_dist.mean
    z = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 4, 8, 8)).astype(np.float32))
    want_img = ref.decode(z).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(check.numpy(), want.numpy(), atol=1e-6)  # the file is a valid original checkpoint
  module, params = load_vae(str(file), config=config)
  got = module.apply({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()), method="encode")
  np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=1e-4)
  got_img = module.apply({"params": params}, jnp.asarray(z.permute(0, 2, 3, 1).numpy()), method="decode")
  np.testing.assert_allclose(np.asarray(got_img), want_img, atol=1e-4, rtol=1e-4)


def test_convert_cli_writes_orbax_that_load_vae_reads(tmp_path, capsys):
  from lidit_jax.convert import __main__ as convert_cli
  ref = _save(tmp_path, "vae", **LAYOUTS["flux"])
  file = tmp_path / "flux_vae.safetensors"
  _write_original(ref, file, "")
  assert convert_cli.main(["vae", str(file), str(tmp_path / "out"), "--config",
                           str(tmp_path / "vae" / "config.json")]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["family"] == "diffusers_vae" and report["unused_tensors"] == []
  assert report["params"] == sum(p.numel() for p in ref.parameters())
  module, params = load_vae(str(tmp_path / "out"))
  assert module.cfg.shift_factor == pytest.approx(0.1159) and module.cfg.latent_channels == 16
  z = np.random.default_rng(4).normal(size=(1, 16, 16, 16)).astype(np.float32)
  with torch.no_grad():
    want = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(z), method="decode")), want,
                             atol=1e-4, rtol=1e-4)
  # Refusals are one message and exit 2: an OUT that is no converted VAE (the diffusers folder), and a layout the
  # shapes cannot tell (its 8 norm groups; inferred: SD's 32) without --config.
  for out, message in (("vae", "is not a converted VAE"), ("out", "not divisible by norm_num_groups 32")):
    with pytest.raises(SystemExit) as e:
      convert_cli.main(["vae", str(file), str(tmp_path / out)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_export_is_a_diffusers_folder_diffusers_loads(tmp_path):
  """Our random tiny VAE written in diffusers' layout (convert.tiny_models --vae, through to_diffusers): diffusers
  loads it with no missing or unexpected keys and computes what our module computes (export's round trip)."""
  from lidit_jax.convert import tiny_models
  from lidit_jax.models import vae
  out = tiny_models.write_tiny_vae(str(tmp_path / "vae"), seed=3, use_quant_conv=False)
  ref, info = diffusers.AutoencoderKL.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  module, params = load_vae(out)
  assert module.cfg == vae.VAEConfig(**{**tiny_models.TINY_VAE, "use_quant_conv": False})
  x = np.random.default_rng(5).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref.double()(torch.from_numpy(x).double().permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))  # decode(encode(x)), the posterior mean
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert np.abs(want).max() > 0.05


def test_a_converted_vae_is_not_a_text_tower(tmp_path):
  from lidit_jax.convert import __main__ as convert_cli, load_hf_text_model, tiny_models
  src = tiny_models.write_tiny_vae(str(tmp_path / "vae"))
  assert convert_cli.main(["vae", src, str(tmp_path / "out")]) == 0
  with pytest.raises(Exception, match="holds a converted diffusers_vae model, not a text model"):
    load_hf_text_model(str(tmp_path / "out"))
