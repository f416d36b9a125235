"""The autoencoder between pixels and the space the denoiser works in (`autoencoder.kind`).

  identity  the demo's pixel space: images in [-1, 1] are the "latents" (factor 1, 3 channels)
  vae       diffusers' AutoencoderKL (`autoencoder.path`: a VAE or pipeline folder, an original single file or
            our converted directory; see `convert.load_vae`), frozen

Both give `encode(params, images_BHWC, rng=None)` -> latents in the denoiser's scale (a posterior sample when
`rng` is given, its mean otherwise) and `decode(params, latents)` -> images in [-1, 1], as pure functions of
their (frozen) params, so they run inside the jitted train step and sampler. The VAE's latent scale is diffusers'
pipelines' convention: (z - shift_factor) * scaling_factor (SD 1.x / 2.x / XL: shift 0; SD3 / Flux: their shift),
or (z - latents_mean) * scaling_factor / latents_std where the config has them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lidit_jax.models import vae as vae_lib


@dataclasses.dataclass(frozen=True)
class Identity:
  factor: int = 1
  channels: int = 3

  def encode(self, params, images_BHWC, rng=None):
    del params, rng
    return images_BHWC

  def decode(self, params, latents_BHWC):
    del params
    return latents_BHWC


@dataclasses.dataclass(frozen=True)
class VAE:
  module: vae_lib.AutoencoderKL

  @property
  def factor(self) -> int:
    return self.module.cfg.downsample_factor

  @property
  def channels(self) -> int:
    return self.module.cfg.latent_channels

  def _offset_and_scale(self):
    cfg = self.module.cfg
    if cfg.latents_mean is not None and cfg.latents_std is not None:
      return jnp.asarray(cfg.latents_mean), cfg.scaling_factor / jnp.asarray(cfg.latents_std)
    return cfg.shift_factor or 0.0, cfg.scaling_factor

  def encode(self, params, images_BHWC, rng=None):
    mean, logvar = self.module.apply({"params": params}, images_BHWC, method="moments")
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    offset, scale = self._offset_and_scale()
    return (z - offset) * scale

  def decode(self, params, latents_BHWC):
    offset, scale = self._offset_and_scale()
    return self.module.apply({"params": params}, latents_BHWC / scale + offset, method="decode")


def build(ae_cfg, dtype=jnp.float32):
  """(autoencoder, its frozen params or None) for the config's `autoencoder` section; the VAE's factor and
  channels must be the ones the section states (they shape the denoiser before anything is loaded)."""
  from lidit_jax import configs
  if ae_cfg.kind == "identity":
    return Identity(), None
  from lidit_jax.convert import load_vae
  path = ae_cfg.get("path", "")
  if not path:
    raise configs.ConfigError("config autoencoder.kind='vae' needs autoencoder.path. Fix: "
                              "--config.autoencoder.path=DIR (a diffusers VAE or pipeline folder, or a converted one)")
  module, params = load_vae(path, dtype)
  ae = VAE(module)
  if (ae.factor, ae.channels) != (ae_cfg.factor, ae_cfg.channels):
    raise configs.ConfigError(
        f"config autoencoder.factor/channels=({ae_cfg.factor}, {ae_cfg.channels}), but the VAE at {path} has "
        f"({ae.factor}, {ae.channels}). Fix: --config.autoencoder.factor={ae.factor} "
        f"--config.autoencoder.channels={ae.channels}")
  return ae, params
