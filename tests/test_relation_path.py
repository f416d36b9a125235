"""Does a relation word reach the pixels? Each stage of the demo's text path, followed for "to the left of" against
"to the right of" (and the same words in swapped order), on the tiny config with random non-zero weights; then
whether a small model can fit four layouts that differ only by the relation word (slow)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidit_jax import sample as sample_lib, state as state_lib, train
from lidit_jax.pipeline import Pipeline, Workdir
from lidit_jax.data import shapes, shapes_eval

from conftest import tiny_config
from test_models import perturb

LEFT = "a red circle to the left of a blue square"
RIGHT = "a red circle to the right of a blue square"
SWAPPED = "a blue square to the left of a red circle"


@pytest.fixture(scope="module")
def setup():
  s = state_lib.setup(tiny_config(**{"model.refiner.rope": True}))
  params = perturb(s.init_state(jax.random.key(0)).params)
  return s, params


def text(s, prompts):
  return s.text_for(prompts)


def relative_change(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12))


def test_relation_word_is_a_kept_token_of_every_tower(setup):
  s, _ = setup
  left, right = text(s, [LEFT]), text(s, [RIGHT])
  for t in s.towers:
    ids_l, ids_r = left[t.name]["input_ids"][0], right[t.name]["input_ids"][0]
    differ = np.nonzero(ids_l != ids_r)[0]
    assert len(differ) == 1  # "left" vs "right", nothing else
    k = int(differ[0])
    assert left[t.name]["prompt_mask"][0, k] == 1 and left[t.name]["attention_mask"][0, k] == 1


def test_towers_carry_the_relation_and_the_word_order_to_later_words(setup):
  s, _ = setup
  batch = text(s, [LEFT, RIGHT, SWAPPED])
  for t in s.towers:
    tb = jax.tree.map(jnp.asarray, batch[t.name])
    h = np.asarray(t.features(s.frozen["towers"][t.name], tb["input_ids"], tb["attention_mask"]), np.float32)
    k = int(np.nonzero(batch[t.name]["input_ids"][0] != batch[t.name]["input_ids"][1])[0][0])
    np.testing.assert_array_equal(h[0, :k], h[1, :k])  # causal: nothing before the word changes
    # ... and every later word ("of a blue square") knows which relation came before it,
    assert relative_change(h[0, k + 1:k + 5], h[1, k + 1:k + 5]) > 1e-2
    # ... and "blue" named second differs from "blue" named first (the word order is in the features).
    ids = batch[t.name]["input_ids"]
    blue = s.towers[0].encoder.tokenizer.convert_tokens_to_ids("blue")
    first, second = int(np.nonzero(ids[2] == blue)[0][0]), int(np.nonzero(ids[0] == blue)[0][0])
    assert relative_change(h[0, second], h[2, first]) > 1e-2


def denoise(s, params, prompts, drop=False):
  feats, valids, keep = state_lib.text_inputs(s.towers, s.frozen["towers"], jax.tree.map(jnp.asarray, text(s, prompts)))
  b = len(prompts)
  x = jax.random.normal(jax.random.key(1), (1, *s.config.data.image_size * np.ones(2, int), 3)).repeat(b, 0)
  return s.model.apply({"params": params}, x, jnp.full((b,), 0.7), feats, valids, keep, jnp.full((b,), drop))


def test_refined_context_keeps_the_relation_and_the_order(setup):
  s, params = setup
  feats, valids, keep = state_lib.text_inputs(s.towers, s.frozen["towers"], jax.tree.map(jnp.asarray,
                                                                                      text(s, [LEFT, RIGHT, SWAPPED])))
  x = jnp.zeros((3, s.config.data.image_size, s.config.data.image_size, 3))
  _, inter = s.model.apply({"params": params}, x, jnp.full((3,), 0.7), feats, valids, keep, jnp.zeros(3, bool),
                           capture_intermediates=lambda m, _: m.name == "conditioner")
  ctx, ctx_valid = map(np.asarray, inter["intermediates"]["conditioner"]["__call__"][0])  # what the DiT
  # cross-attends to, and where it may: the captions' words, the instruction and padding masked out
  np.testing.assert_array_equal(ctx_valid[0], ctx_valid[1])
  assert ctx_valid[0].sum() == 2 * len(LEFT.split())  # the caption's words of both towers, nothing else
  assert relative_change(ctx[0][ctx_valid[0]], ctx[1][ctx_valid[1]]) > 1e-2
  assert relative_change(ctx[0][ctx_valid[0]], ctx[2][ctx_valid[2]]) > 1e-2  # same words, other order


def test_denoiser_output_depends_on_the_relation_unless_the_caption_is_dropped(setup):
  s, params = setup
  v = np.asarray(denoise(s, params, [LEFT, RIGHT, SWAPPED]))
  assert relative_change(v[0], v[1]) > 1e-3 and relative_change(v[0], v[2]) > 1e-3
  null = np.asarray(denoise(s, params, [LEFT, RIGHT], drop=True))
  np.testing.assert_allclose(null[0], null[1], atol=1e-6)  # the learned null context replaces the whole text


def test_dit_sees_where_each_patch_is(setup):
  s, params = setup
  feats, valids, keep = state_lib.text_inputs(s.towers, s.frozen["towers"], jax.tree.map(jnp.asarray, text(s, [LEFT])))
  x = jnp.zeros((1, s.config.data.image_size, s.config.data.image_size, 3))  # no content: only positions differ
  v = np.asarray(s.model.apply({"params": params}, x, jnp.full((1,), 0.7), feats, valids, keep, jnp.zeros(1, bool)))
  p = s.config.model.patch_size
  # Two interior patches of the 8 x 8 grid, beyond the ResBlock's reach of the zero padding: with no content they
  # differ only through the sin-cos positions (identical inputs would give identical outputs, bit for bit).
  patch = lambda r, q: v[0, r * p:(r + 1) * p, q * p:(q + 1) * p]
  assert relative_change(patch(2, 2), patch(2, 5)) > 1e-4


def test_guided_sampling_keeps_the_relation(setup):
  s, params = setup
  images = sample_lib.generate_images(Pipeline(Workdir.of(s, params)), [LEFT, RIGHT], 1, seed=0, steps=3, cfg_scale=3.0,
                                      noise_ids=[0, 0])[:, 0].astype(np.float32)
  assert np.abs(images[0] - images[1]).max() > 8  # same noise, different relation word: different pixels


def test_train_step_drops_captions_at_the_configured_rate():
  c = tiny_config()
  drops = jax.random.bernoulli(jax.random.key(0), c.data.caption_dropout, (4000,))
  assert abs(float(drops.mean()) - c.data.caption_dropout) < 0.02


def test_relation_probe_measures_offsets_of_rendered_layouts():
  """The probe's arithmetic on renders that obey the relation (+ offsets) and on renders that ignore it."""
  a, b = ("red", "circle"), ("blue", "square")
  rng = np.random.default_rng(0)
  obey = {r: shapes.render(shapes.Scene((a, b), ((0, r, 1),)), rng) for r in shapes.RELATIONS}
  offsets = {r: shapes_eval.offset(img, a, b) for r, img in obey.items()}
  assert offsets["to the left of"][0] > 5 and offsets["to the right of"][0] < -5
  assert offsets["above"][1] > 5 and offsets["below"][1] < -5


@pytest.mark.slow
def test_a_small_model_fits_four_layouts_that_differ_only_by_the_relation_word():
  """Overfit: one pair of objects, one layout per relation word, every image from the same noise at sampling.
  A model that can read the relation word puts the second object on the asked side; one that cannot draws
  the same picture for all four words (the probe's offsets near 0)."""
  c = tiny_config(**{"model.width": 64, "model.depth": 3, "model.num_heads": 4, "model.refiner.rope": True,
                     "model.refiner.num_heads": 4, "optim.lr": 2e-3, "optim.warmup_steps": 20,
                     "optim.ema_decay": 0.9, "train.num_steps": 400, "train.batch_size": 8,
                     "data.caption_dropout": 0.1})
  s = state_lib.setup(c)
  a, b = ("red", "circle"), ("blue", "square")
  scenes = [shapes.Scene((a, b), ((0, r, 1),)) for r in shapes.RELATIONS]
  images = np.stack([shapes.render(sc, np.random.default_rng(k)) for k, sc in enumerate(scenes)] * 2)
  captions = [sc.caption(0) for sc in scenes] * 2
  batch = train.device_batch({"image": images, "text": s.text_for(captions)}, s.mesh)
  state, step = s.init_state(jax.random.key(0)), train.make_train_step(s)
  for _ in range(c.train.num_steps):
    state, metrics = step(state, s.frozen, batch, jax.random.key(1))
  probe = shapes_eval.relation_probe(Pipeline(Workdir.of(s, state.ema_params)), 1, steps=10, cfg_scale=2.0,
                                  pairs=[(a, b)])
  off = probe["relation_offsets"]
  assert off["to the left of"] > 4 and off["to the right of"] < -4, off
  assert off["above"] > 4 and off["below"] < -4, off
  assert probe["relation_sensitivity"] > 4
