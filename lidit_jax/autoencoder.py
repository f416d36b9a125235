"""The autoencoder between pixels and the space the denoiser works in (`autoencoder.kind`).

  identity  the demo's pixel space: images in [-1, 1] are the "latents" (factor 1, 3 channels)
  patches   pixel space as factor x factor patches of 3 factor^2 channels (a U-Net on the shapes demo's 32 px at
            factor 4 runs on an 8 x 8 grid, as SD's on latents and the demo's DiT on its 4 px patches)
  vae       diffusers' AutoencoderKL (`autoencoder.path`: a VAE or pipeline folder, an original single file or
            our converted directory; see `convert.load_vae`), frozen
  dc_ae     diffusers' AutoencoderDC (Sana's deep-compression autoencoder, 32x; `autoencoder.path`: its folder, a
            pipeline folder or our converted directory), frozen; deterministic (no posterior to sample)

Both give `encode(params, images_BHWC, rng=None)` -> latents in the denoiser's scale (a posterior sample when
`rng` is given, its mean otherwise) and `decode(params, latents)` -> images in [-1, 1], as pure functions of
their (frozen) params, so they run inside the jitted train step and sampler. Precomputed latents
(`data.latents`) hold `stored(params, images)`: the posterior mean and, for the VAE, its standard deviation
(channels [mean | std], in the denoiser's scale); `from_stored(stored, rng)` draws the sample the train step
trains on, so a cached dataset trains as the images would (diffusers' trainers: `latent_dist.sample()`). The VAE's latent scale is diffusers'
pipelines' convention: (z - shift_factor) * scaling_factor (SD 1.x / 2.x / XL: shift 0; SD3 / Flux: their shift),
or (z - latents_mean) * scaling_factor / latents_std where the config has them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from lidit_jax.config_checks import ConfigError, fail, one_of
from lidit_jax.convert import diffusers_dc_ae, diffusers_vae, registry, safetensors_io


# identity (pixels), patches (pixels as factor x factor patches, 3 factor^2 channels), vae or dc_ae: path = a
# diffusers VAE / DC-AE / pipeline folder (a VAE also an original single file) or a converted directory; frozen
CONFIG_DEFAULTS = {"autoencoder": dict(kind="identity", factor=1, channels=3, path="", dtype="float32")}


def validate(ae) -> None:
  """Its section's checks (configs.validate calls it), each a ConfigError naming value and fix."""
  one_of("autoencoder.kind", ae.kind, {"identity", "patches", "vae", "dc_ae"})
  one_of("autoencoder.dtype", ae.dtype, {"float32", "bfloat16"})
  if ae.kind == "identity" and (ae.factor != 1 or ae.channels != 3):
    fail("autoencoder.factor/channels", (ae.factor, ae.channels), "pixel space (identity) means factor 1, 3 channels",
         "set --config.autoencoder.factor=1 --config.autoencoder.channels=3")
  if ae.kind == "patches" and (ae.factor < 1 or ae.channels != 3 * ae.factor ** 2):
    fail("autoencoder.factor/channels", (ae.factor, ae.channels), "patches of factor f hold 3 f^2 channels",
         f"set --config.autoencoder.channels={3 * max(1, ae.factor) ** 2} (factor {max(1, ae.factor)})")


def from_uint8(images_BHWC):
  """Image bytes -> floats in [-1, 1], the autoencoders' input (the train step and data.latents)."""
  return images_BHWC.astype(jnp.float32) / 127.5 - 1.0


def stored_channels(ae_cfg) -> int:
  """Channels of a precomputed latent for the config's `autoencoder`: a VAE stores [mean | std]."""
  return ae_cfg.channels * (2 if ae_cfg.kind == "vae" else 1)


class Deterministic:
  """An autoencoder whose encoding draws nothing: stored latents are the latents."""

  def stored(self, params, images_BHWC):
    return self.encode(params, images_BHWC)

  def from_stored(self, stored_BhwC, rng):
    del rng
    return stored_BhwC


@dataclasses.dataclass(frozen=True)
class Pixels(Deterministic):
  """Pixel space, each factor x factor patch one position of 3 factor^2 channels (lossless space-to-depth; factor
  1: the pixels themselves). A convolutional denoiser then runs on a coarse grid as on a VAE's latents, where a
  DiT patchifies pixels itself."""
  factor: int = 1

  @property
  def channels(self) -> int:
    return 3 * self.factor ** 2

  @property
  def stored_channels(self) -> int:
    return self.channels

  def encode(self, params, images_BHWC, rng=None):
    del params, rng
    f = self.factor
    if f == 1:
      return images_BHWC
    b, h, w, c = images_BHWC.shape
    x = images_BHWC.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // f, w // f, f * f * c)

  def decode(self, params, latents_BHWC):
    del params
    f = self.factor
    if f == 1:
      return latents_BHWC
    b, h, w, c = latents_BHWC.shape
    x = latents_BHWC.reshape(b, h, w, f, f, c // (f * f)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * f, w * f, c // (f * f))

  def encode_flops(self, params, image_hw) -> float:
    return 0.0

  def encode_peak_bytes(self, batch: int, image_hw) -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class Converted:
  """A converted diffusers autoencoder `module`: its factor and latent channels from its config."""
  module: Any

  @property
  def factor(self) -> int:
    return self.module.cfg.downsample_factor

  @property
  def channels(self) -> int:
    return self.module.cfg.latent_channels


class VAE(Converted):
  """diffusers' AutoencoderKL: a posterior per image (its mean, or a sample with `rng`), stored as [mean | std]."""

  def _offset_and_scale(self):
    cfg = self.module.cfg
    if cfg.latents_mean is not None and cfg.latents_std is not None:
      return jnp.asarray(cfg.latents_mean), cfg.scaling_factor / jnp.asarray(cfg.latents_std)
    return cfg.shift_factor or 0.0, cfg.scaling_factor

  @property
  def stored_channels(self) -> int:
    return 2 * self.channels

  def _moments(self, params, images_BHWC):
    """Posterior mean and standard deviation, in the denoiser's scale."""
    mean, logvar = self.module.apply({"params": params}, images_BHWC, method="moments")
    offset, scale = self._offset_and_scale()
    return (mean - offset) * scale, jnp.exp(0.5 * logvar) * scale

  def encode(self, params, images_BHWC, rng=None):
    mean, std = self._moments(params, images_BHWC)
    return mean if rng is None else mean + std * jax.random.normal(rng, mean.shape, mean.dtype)

  def stored(self, params, images_BHWC):
    return jnp.concatenate(self._moments(params, images_BHWC), axis=-1)

  def from_stored(self, stored_BhwC, rng):
    assert stored_BhwC.shape[-1] == self.stored_channels, stored_BhwC.shape
    mean, std = jnp.split(stored_BhwC, 2, axis=-1)
    return mean + std * jax.random.normal(rng, mean.shape, mean.dtype)

  def decode(self, params, latents_BHWC):
    offset, scale = self._offset_and_scale()
    return self.module.apply({"params": params}, latents_BHWC / scale + offset, method="decode")

  def encode_flops(self, params, image_hw) -> float:
    """Forward FLOPs of encoding one image, XLA's count of the lowered encoder (shapes only: `params` may be
    ShapeDtypeStructs; nothing is compiled)."""
    image = jax.ShapeDtypeStruct((1, *image_hw, self.module.cfg.in_channels), jnp.float32)
    return float(jax.jit(self._moments).lower(params, image).cost_analysis()["flops"])

  def encode_peak_bytes(self, batch: int, image_hw) -> int:
    """Estimated temporary bytes of encoding `batch` images (forward only: the encoder is frozen). The peak is
    three feature maps at full resolution (a resnet's input, its normalised and its convolved activations) or
    the mid block's attention probabilities over every latent position, whichever is larger; within 3 % of
    what XLA allocates for our encoder on CPU (tests/test_autoencoder.py)."""
    cfg, (h, w) = self.module.cfg, image_hw
    itemsize = jnp.dtype(self.module.dtype).itemsize
    full = h * w * cfg.block_out_channels[0]
    low = (h // self.factor) * (w // self.factor)
    attention = (4 * low * low + 2 * low * cfg.block_out_channels[-1] * itemsize  # softmax in float32
                 if cfg.mid_block_add_attention else 0)
    return int(batch * max(3 * full * itemsize, attention))


class DCAE(Converted, Deterministic):
  """Sana's DC-AE: latents = encoder(x) * scaling_factor, as SanaPipeline scales them; deterministic, so `rng` and
  a stored standard deviation have no use (stored latents are the latents)."""

  @property
  def stored_channels(self) -> int:
    return self.channels

  def encode(self, params, images_BHWC, rng=None):
    del rng
    return self.module.apply({"params": params}, images_BHWC, method="encode") * self.module.cfg.scaling_factor

  def decode(self, params, latents_BHWC):
    return self.module.apply({"params": params}, latents_BHWC / self.module.cfg.scaling_factor, method="decode")

  def encode_flops(self, params, image_hw) -> float:
    image = jax.ShapeDtypeStruct((1, *image_hw, self.module.cfg.in_channels), jnp.float32)
    return float(jax.jit(self.encode).lower(params, image).cost_analysis()["flops"])

  def encode_peak_bytes(self, batch: int, image_hw) -> int:
    """About three feature maps at full resolution (a ResBlock's input, activation and convolution), as the VAE."""
    h, w = image_hw
    return int(batch * 3 * h * w * self.module.cfg.encoder_block_out_channels[0] * jnp.dtype(self.module.dtype).itemsize)


# autoencoder.kind -> (its conversion family, the diffusers class a pipeline's vae/ holds, our wrapper)
KINDS = {"vae": (diffusers_vae, "AutoencoderKL", VAE), "dc_ae": (diffusers_dc_ae, "AutoencoderDC", DCAE)}


def build(ae_cfg, abstract: bool = False):
  """(autoencoder, its frozen params or None) for the config's `autoencoder` section, the VAE's params in
  `autoencoder.dtype`; the VAE's factor and channels must be the ones the section states (they shape the
  denoiser before anything is loaded). `abstract=True` gives ShapeDtypeStructs instead (planning), or
  (None, None) when the VAE does not exist yet: a planned run then trains on precomputed latents."""
  if ae_cfg.kind in ("identity", "patches"):
    return Pixels(ae_cfg.factor), None
  path, dtype = ae_cfg.get("path", ""), jnp.dtype(ae_cfg.get("dtype", "float32"))
  conversion, class_name, wrapper = KINDS[ae_cfg.kind]
  if abstract:
    if not path or not os.path.exists(os.path.expanduser(path)):
      return None, None
    if os.path.isdir(os.path.expanduser(path)):  # a pipeline folder (ours too): its vae/
      path = safetensors_io.component_dir(path, "vae", class_name)
    module = (registry.from_description(registry.read_marker(path), dtype)[2] if registry.marker(path)
              else conversion.Conversion.prepare(path, dtype).module)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype),
                          registry.strip_boxes(conversion.abstract_params(module)))
  elif not path:
    raise ConfigError(f"config autoencoder.kind={ae_cfg.kind!r} needs autoencoder.path. Fix: "
                      f"--config.autoencoder.path=DIR (a diffusers {class_name} or pipeline folder, or a converted one)")
  else:
    module, params = (diffusers_vae.load_vae if ae_cfg.kind == "vae" else conversion.load)(path, dtype)
  ae = wrapper(module)
  if (ae.factor, ae.channels) != (ae_cfg.factor, ae_cfg.channels):
    raise ConfigError(
        f"config autoencoder.factor/channels=({ae_cfg.factor}, {ae_cfg.channels}), but the {class_name} at {path} has "
        f"({ae.factor}, {ae.channels}). Fix: --config.autoencoder.factor={ae.factor} "
        f"--config.autoencoder.channels={ae.channels}")
  return ae, params
