"""The DDPM objective: every sampler equals the diffusers scheduler of the same config step for step (the model
inputs at every call and the final sample), and the training targets / weights are diffusers' trainers'."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lidit_jax import configs
from lidit_jax.objectives import ddpm

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
            prediction_type="epsilon")
CLASSES = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
           "euler_ancestral": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
CASES = [  # (sampler, steps, scheduler config changes)
    ("ddim", 10, {}),
    ("ddim", 7, dict(timestep_spacing="trailing", steps_offset=0, prediction_type="v_prediction",
                     rescale_betas_zero_snr=True, set_alpha_to_one=True)),
    ("ddim", 8, dict(timestep_spacing="linspace", prediction_type="sample", clip_sample=True, beta_schedule="linear",
                     beta_start=0.0001, beta_end=0.02)),
    ("ddim", 6, dict(eta=0.7)),
    ("pndm", 10, dict(skip_prk_steps=True)),
    ("pndm", 12, dict(skip_prk_steps=True, prediction_type="v_prediction", timestep_spacing="linspace")),
    ("pndm", 9, dict(skip_prk_steps=True, timestep_spacing="trailing", set_alpha_to_one=True)),
    ("euler", 10, {}),
    ("euler", 9, dict(timestep_spacing="linspace", prediction_type="v_prediction")),
    ("euler", 12, dict(use_karras_sigmas=True, timestep_spacing="trailing", steps_offset=0)),
    ("euler", 6, dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2")),
    ("euler_ancestral", 10, {}),
    ("euler_ancestral", 8, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    ("dpmpp_2m", 10, {}),
    ("dpmpp_2m", 20, dict(timestep_spacing="linspace", prediction_type="v_prediction")),
    ("dpmpp_2m", 12, dict(use_karras_sigmas=True)),
    ("dpmpp_2m", 9, dict(use_karras_sigmas=True, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                         prediction_type="sample")),
    # zero terminal SNR: sigma_max = 4096, where a float32 state resolves 2.4e-4 (so 1e-5 is below its precision)
    ("euler", 8, dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), 1e-4),
    ("dpmpp_2m", 11, dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")),
]
SHAPE = (2, 4, 4, 3)


def model_np(x, timestep):
  """A deterministic stand-in for the network, the same in both frameworks: depends on input and timestep."""
  return 0.8 * np.tanh(x) + 0.3 * np.cos(timestep / 170.0) - 0.1 * x


def section(changes):
  keys = dict(SD15, **{k: v for k, v in changes.items() if k != "skip_prk_steps"})
  base = configs.base_config().ddpm.to_dict()
  return ml_collections.ConfigDict({**base, **keys})


def reference(sampler, steps, changes, noise, step_noise):
  cls = getattr(schedulers, CLASSES[sampler])
  kw = {k: v for k, v in dict(SD15, **changes).items() if k != "eta"}
  if sampler == "dpmpp_2m":
    kw.pop("set_alpha_to_one"), kw.pop("clip_sample")
  elif sampler in ("euler", "euler_ancestral"):
    kw.pop("set_alpha_to_one"), kw.pop("clip_sample")
  elif sampler == "pndm":
    kw.pop("clip_sample"), kw.pop("rescale_betas_zero_snr", None)
  sched = cls(**kw)
  sched.set_timesteps(steps)
  x = torch.from_numpy(noise.copy()) * sched.init_noise_sigma
  inputs = []
  for i, t in enumerate(sched.timesteps):
    inp = sched.scale_model_input(x, t)
    inputs.append((inp.numpy().copy(), float(t)))
    out = torch.from_numpy(model_np(inp.numpy().astype(np.float64), float(t)).astype(np.float32))
    extra = {}
    if sampler == "ddim" and changes.get("eta"):
      extra = dict(eta=changes["eta"], variance_noise=torch.from_numpy(step_noise[i]))
    if sampler == "euler_ancestral":
      import diffusers.schedulers.scheduling_euler_ancestral_discrete as mod
      mod_randn, mod.randn_tensor = mod.randn_tensor, lambda *a, **k: torch.from_numpy(step_noise[i])
      try:
        x = sched.step(out, t, x, **extra).prev_sample
      finally:
        mod.randn_tensor = mod_randn
    else:
      x = sched.step(out, t, x, **extra).prev_sample
  return inputs, x.numpy()


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_sampler_equals_the_diffusers_scheduler_step_for_step(case):
  sampler, steps, changes, tol = (*case, 1e-5)[:4]
  rng = jax.random.key(3)
  noise = np.asarray(jax.random.normal(jax.random.key(1), SHAPE))
  num_calls = steps + 1 if sampler == "pndm" else steps
  step_noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(rng, i), SHAPE)) for i in range(num_calls)])
  want_inputs, want = reference(sampler, steps, changes, noise, step_noise)
  cfg = section(changes)
  obj = ddpm.DDPM(cfg)
  seen = []

  def net(x, t):
    seen.append((np.asarray(x), float(t[0]) * cfg.num_train_timesteps))
    return jnp.asarray(model_np(np.asarray(x, np.float64), float(t[0]) * cfg.num_train_timesteps), jnp.float32)

  with jax.disable_jit():  # the loop runs in Python, so the stand-in network sees every call
    got = np.asarray(obj.sample(net, jnp.asarray(noise), steps, sampler, rng=rng))
  assert len(seen) == len(want_inputs) == num_calls
  for i, ((x, t), (x_ref, t_ref)) in enumerate(zip(seen, want_inputs)):
    assert t == pytest.approx(t_ref, abs=1e-3), (i, t, t_ref)
    np.testing.assert_allclose(x, x_ref, atol=tol, rtol=tol, err_msg=f"model input at call {i}")
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  # and the same under jit (the network is then traced: an exact jnp copy of the stand-in)
  jnet = lambda x, t: (0.8 * jnp.tanh(x) + 0.3 * jnp.cos(t[:, None, None, None] * cfg.num_train_timesteps / 170.0)
                       - 0.1 * x)
  jitted = jax.jit(lambda z: obj.sample(jnet, z, steps, sampler, rng=rng))(jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(jitted), want, atol=2 * tol, rtol=2 * tol)


def test_scheduler_config_round_trip():
  """A diffusers scheduler_config.json gives the section and sampler that reproduce it."""
  values, sampler = ddpm.from_scheduler_config({"_class_name": "EulerDiscreteScheduler", **SD15,
                                               "use_karras_sigmas": True, "trained_betas": None})
  assert sampler == "euler" and values["use_karras_sigmas"] and values["beta_schedule"] == "scaled_linear"
  with pytest.raises(ValueError, match="LMSDiscreteScheduler"):
    ddpm.from_scheduler_config({"_class_name": "LMSDiscreteScheduler"})


def test_training_targets_and_weights_are_diffusers_trainers():
  """x_t is DDPMScheduler.add_noise, the v target its get_velocity, min-SNR weights from training_utils'
  compute_snr as diffusers' train_text_to_image weighs them; offset noise is constant over each channel."""
  from diffusers.training_utils import compute_snr
  x0 = jax.random.normal(jax.random.key(0), SHAPE)
  for kind, gamma in (("epsilon", 0.0), ("v_prediction", 5.0), ("epsilon", 5.0), ("sample", 5.0)):
    cfg = section(dict(prediction_type=kind, snr_gamma=gamma))
    obj = ddpm.DDPM(cfg)
    draws = obj.draw(jax.random.key(1), jax.random.key(2), x0)
    t = np.asarray(draws["t"]).astype(np.int64)
    ref = schedulers.DDPMScheduler(**{k: v for k, v in {**SD15, "prediction_type": kind}.items()
                                      if k != "set_alpha_to_one"})
    x0_t, eps_t, t_t = (torch.from_numpy(np.asarray(a).copy()) for a in (x0, draws["eps"], t))
    want_xt = ref.add_noise(x0_t, eps_t, t_t).numpy()
    target = {"epsilon": eps_t, "v_prediction": ref.get_velocity(x0_t, eps_t, t_t), "sample": x0_t}[kind].numpy()
    seen = {}

    def zero_net(x, tt):
      seen["x"], seen["t"] = x, tt
      return jnp.zeros_like(x)
    loss = np.asarray(obj.loss(zero_net, x0, draws))
    np.testing.assert_allclose(np.asarray(seen["x"]), want_xt, atol=1e-5)
    np.testing.assert_allclose(np.asarray(seen["t"]), t / 1000.0, atol=1e-7)
    weight = np.ones(len(t))
    if gamma:
      snr = compute_snr(ref, t_t).numpy()
      weight = np.minimum(snr, gamma) / {"epsilon": snr, "v_prediction": snr + 1, "sample": 1.0}[kind]
    np.testing.assert_allclose(loss, weight * np.mean(target.reshape(len(t), -1) ** 2, axis=1), rtol=1e-5)
  off = ddpm.DDPM(section(dict(offset_noise=0.1)))
  plain = ddpm.DDPM(section({}))
  d_off, d_plain = off.draw(jax.random.key(1), jax.random.key(2), x0), plain.draw(jax.random.key(1), jax.random.key(2), x0)
  shift = np.asarray(d_off["eps"] - d_plain["eps"])
  assert np.abs(shift).max() > 0.01 and np.allclose(shift, shift[:, :1, :1, :], atol=1e-6)
  # zero terminal SNR: epsilon's weight at snr = 0 is its limit 1, not NaN
  zsnr = ddpm.DDPM(section(dict(rescale_betas_zero_snr=True, snr_gamma=5.0)))
  last = {"t": jnp.full((2,), 999.0), "eps": jnp.ones(SHAPE)}
  assert np.isfinite(np.asarray(zsnr.loss(lambda x, tt: jnp.zeros_like(x), x0[:2], last))).all()


def test_lidit_trains_and_samples_under_ddpm(tmp_path):
  """The objective is a swappable part: the same trainer and sampler run LI-DiT on v-prediction DDPM with
  min-SNR weights, and every sampler gives finite images; a wrong sampler name is refused by name."""
  from conftest import tiny_config
  from lidit_jax import sample, state, train
  from lidit_jax.pipeline import Pipeline, Workdir
  over = {"objective.kind": "ddpm", "ddpm.prediction_type": "v_prediction", "ddpm.snr_gamma": 5.0,
          "sample.sampler": "dpmpp_2m", "train.num_steps": 3}
  config = tiny_config(**over)
  train.train_and_evaluate(config, str(tmp_path))
  s, params, step = state.restore_for_inference(config, str(tmp_path))
  assert step == 3
  # the in-training samples used dpmpp_2m; the sampler drawing fresh noise at every step runs here
  assert any(n.endswith(".png") for n in os.listdir(os.path.join(str(tmp_path), "samples")))
  imgs = sample.generate_images(Pipeline(Workdir.of(s, params)), ["a red circle"], 1, steps=4, cfg_scale=2.0,
                                sampler="euler_ancestral")
  assert imgs.shape == (1, 1, 32, 32, 3) and imgs.std() > 0
  with pytest.raises(configs.ConfigError, match="sample.sampler='heun'"):
    tiny_config(**{**over, "sample.sampler": "heun"})
  with pytest.raises(configs.ConfigError, match="ddpm.beta_schedule='cosine'"):
    tiny_config(**{**over, "ddpm.beta_schedule": "cosine"})
