"""Tests for the procedural shapes dataset, its held-out split, and the detector/scorer."""
import numpy as np
import pytest

from lidit_jax.data import shapes as S


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur (sigma ~0.7 px), edges replicated."""
    p = np.pad(image, ((1, 1), (0, 0), (0, 0)), mode="edge")
    out = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    p = np.pad(out, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4


def _render(scene, seed=0):
    return S.render(scene, np.random.default_rng(seed))


# --------------------------------------------------------------------------- data source
def test_example_format_and_determinism():
    a, b = S.ShapesSource(seed=3), S.ShapesSource(seed=3)
    e1, e2 = a.example(17), b.example(17)
    assert e1["image"].shape == (32, 32, 3) and e1["image"].dtype == np.float32
    assert -1.0 <= e1["image"].min() and e1["image"].max() <= 1.0
    np.testing.assert_array_equal(e1["image"], e2["image"])
    assert e1["caption"] == e2["caption"] and e1["scene"] == e2["scene"]
    e3 = a.example(18)
    assert not np.array_equal(e1["image"], e3["image"])
    # A different seed gives different data at the same index.
    assert not np.array_equal(e1["image"], S.ShapesSource(seed=4).example(17)["image"])


def test_batch_matches_examples():
    src = S.ShapesSource(seed=1)
    batch = src.batch(5, 4)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    for k in range(4):
        ex = src.example(5 + k)
        np.testing.assert_array_equal(batch["image"][k], ex["image"])
        assert batch["caption"][k] == ex["caption"]


def test_render_is_deterministic_given_rng():
    scene = S.Scene((("red", "circle"), ("blue", "square")), ((0, "above", 1),))
    np.testing.assert_array_equal(_render(scene, 7), _render(scene, 7))
    img = _render(scene, 7)
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    assert tuple(img[0, 0]) == S.BACKGROUND  # border stays background


def test_object_count_distribution():
    src = S.ShapesSource(seed=0, object_weights=(0.2, 0.45, 0.35))
    counts = np.bincount([len(src.example(i)["scene"].objects) for i in range(400)], minlength=4)
    assert counts[0] == 0 and all(counts[1:] > 40)
    assert counts[2] > counts[1]  # 0.45 vs 0.2


# --------------------------------------------------------------------------- held-out split
def test_heldout_split_is_disjoint_and_covers_all_objects():
    rng = np.random.default_rng(0)
    seen_objects = set()
    for _ in range(3000):
        scene = S.sample_scene(rng, "train")
        assert not S.is_heldout(scene)
        seen_objects.update(scene.objects)
    assert seen_objects == {(c, s) for c in S.COLOURS for s in S.SHAPES}

    held = S.heldout_scenes(200, seed=0)
    assert held == S.heldout_scenes(200, seed=0)
    assert all(S.is_heldout(s) and len(s.objects) >= 2 for s in held)
    assert {len(s.objects) for s in held} == {2, 3}
    assert all(len(s.objects) == 3 for s in S.heldout_scenes(20, min_objects=3))

    heldout_source = S.ShapesSource(split="heldout")
    assert all(S.is_heldout(heldout_source.example(i)["scene"]) for i in range(50))


def test_heldout_rule_ignores_wording():
    # Mirrored wording of the same picture shares held-out status, and so do all templates.
    for a, rel, b in S.heldout_facts():
        scene = S.Scene((a, b), ((0, rel, 1),))
        mirrored = S.Scene((b, a), ((0, {"to the left of": "to the right of", "above": "below"}[rel], 1),))
        assert S.is_heldout(scene) and S.is_heldout(mirrored)
    one = S.Scene((("red", "circle"),))
    assert not S.is_heldout(one)
    # Around 10% of 2-object combinations are held out.
    objs = [(c, s) for c in S.COLOURS for s in S.SHAPES]
    two = [S.Scene((a, b), ((0, r, 1),)) for a in objs for b in objs if a != b for r in S.RELATIONS]
    frac = np.mean([S.is_heldout(s) for s in two])
    assert 0.03 < frac < 0.2


def test_heldout_fact_never_implied_in_training():
    # A 3-object row containing a held-out fact only between its outer objects is held out too.
    (a, rel, c) = S.heldout_facts()[0]
    b = next(o for o in [(col, s) for col in S.COLOURS for s in S.SHAPES]
             if o not in (a, c) and not S.is_heldout(S.Scene((a, o), ((0, rel, 1),)))
             and not S.is_heldout(S.Scene((o, c), ((0, rel, 1),))))
    assert S.is_heldout(S.Scene((a, b, c), ((0, rel, 1), (1, rel, 2))))


# --------------------------------------------------------------------------- captions
def test_captions_name_everything_and_use_vocabulary():
    vocab = set(S.VOCABULARY)
    rng = np.random.default_rng(1)
    for split in ("train", "heldout"):
        for _ in range(300):
            scene = S.sample_scene(rng, split)
            for t in range(S.N_TEMPLATES):
                cap = scene.caption(t)
                words = cap.split()
                assert set(words) <= vocab and cap == cap.lower() and len(words) <= 25
                # Objects are named in `objects` order, every relation phrase appears.
                pos = [cap.find(f"{c} {s}") for c, s in scene.objects]
                assert all(p >= 0 for p in pos) and pos == sorted(pos)
                for _, rel, _ in scene.relations:
                    assert rel in cap
    src = S.ShapesSource(seed=2)
    assert all(set(src.example(i)["caption"].split()) <= vocab for i in range(100))


def test_caption_examples():
    scene = S.Scene((("red", "circle"), ("blue", "square")), ((0, "to the left of", 1),))
    assert scene.caption() == "a red circle to the left of a blue square"
    row = S.Scene((("red", "circle"), ("blue", "square"), ("green", "triangle")),
                  ((0, "to the left of", 1), (1, "to the left of", 2)))
    assert row.caption() == "a red circle to the left of a blue square to the left of a green triangle"
    assert row.caption(1) == ("a red circle to the left of a blue square and the blue square "
                              "to the left of a green triangle")


def test_scene_validation():
    with pytest.raises(ValueError):
        S.Scene((("red", "circle"), ("red", "circle")), ((0, "above", 1),))
    with pytest.raises(ValueError):
        S.Scene((("purple", "circle"),))
    with pytest.raises(ValueError):
        S.Scene((("red", "circle"), ("blue", "square")), ((0, "near", 1),))


# --------------------------------------------------------------------------- layout
def test_layout_constraints_hold():
    rng = np.random.default_rng(5)
    smin, smax, gap, min_sep = S._geometry(32)
    for _ in range(300):
        scene = S.sample_scene(rng, "train")
        boxes = S.layout(scene, rng, 32)
        assert ((boxes[:, 2] >= smin) & (boxes[:, 2] <= smax)).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:3] <= 32).all()
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (xa, ya, sa), (xb, yb, sb) = boxes[a], boxes[b]
                assert max(xb - xa - sa, xa - xb - sb, yb - ya - sa, ya - yb - sb) >= 2
        centres = boxes[:, :2] + boxes[:, 2:3] / 2
        for i, rel, j in scene.relations:
            dx, dy = centres[j] - centres[i]
            main, cross = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                           "above": (dy, dx), "below": (-dy, dx)}[rel]
            assert main >= 8 and abs(cross) < main


# --------------------------------------------------------------------------- detector / scorer
def _accuracy(n, noise=0.0, blur=False, seed=0):
    src = S.ShapesSource(seed=seed)
    rng = np.random.default_rng(seed + 100)
    ok = 0
    for i in range(n):
        ex = src.example(i)
        img = ex["image"].astype(np.float64)
        if blur:
            img = _blur(img)
        img = img + noise * rng.standard_normal(img.shape)
        ok += S.score(ex["scene"], S.detect(img))["all"]
    return ok / n


def test_detector_on_clean_renders():
    assert _accuracy(300) >= 0.99


def test_detector_on_noisy_blurred_renders():
    assert _accuracy(300, noise=0.1, blur=True, seed=1) >= 0.95


def test_detect_accepts_uint8_and_float():
    scene = S.Scene((("yellow", "triangle"), ("green", "circle")), ((0, "below", 1),))
    img = _render(scene, 3)
    d8 = S.detect(img)
    df = S.detect(img.astype(np.float32) / 127.5 - 1.0)
    assert [(d.colour, d.shape) for d in d8] == [(d.colour, d.shape) for d in df]
    assert sorted((d.colour, d.shape) for d in d8) == [("green", "circle"), ("yellow", "triangle")]
    yellow = next(d for d in d8 if d.colour == "yellow")
    green = next(d for d in d8 if d.colour == "green")
    assert yellow.cy > green.cy + 8  # y grows downwards
    assert S.detect(np.zeros((32, 32, 3), np.uint8) + np.uint8(S.BACKGROUND)) == []


def test_detector_ignores_specks():
    img = np.tile(np.asarray(S.BACKGROUND, np.uint8), (32, 32, 1))
    img[10:12, 10:12] = S.COLOURS["red"]  # 4 px: a speck, not an object
    assert S.detect(img) == []


def test_score_detects_wrong_attributes_and_relations():
    target = S.Scene((("red", "circle"), ("blue", "square")), ((0, "to the left of", 1),))
    ok = S.score(target, S.detect(_render(target)))
    assert ok["all"] and ok["object"] == [True, True] and ok["relation"] == [True]

    # Mirrored relation: objects right, relation wrong.
    mirrored = S.Scene(target.objects, ((0, "to the right of", 1),))
    r = S.score(target, S.detect(_render(mirrored)))
    assert r["object"] == [True, True] and r["relation"] == [False] and not r["all"]

    # Swapped colours: each phrase falls back to its same-colour detection, with the wrong shape.
    swapped = S.Scene((("blue", "circle"), ("red", "square")), target.relations)
    r = S.score(target, S.detect(_render(swapped)))
    assert r["colour"] == [True, True] and r["shape"] == [False, False]
    assert r["object"] == [False, False] and not r["all"] and r["count"]

    # Wrong colour on one object: matched by shape, colour False.
    recoloured = S.Scene((("green", "circle"), ("blue", "square")), target.relations)
    r = S.score(target, S.detect(_render(recoloured)))
    assert r["colour"] == [False, True] and r["shape"] == [True, True]
    assert r["object"] == [False, True] and not r["all"]

    # Missing object: unmatched phrase and its relation fail, and so does the count.
    alone = S.Scene((("red", "circle"),))
    r = S.score(target, S.detect(_render(alone)))
    assert r["object"] == [True, False] and r["relation"] == [False] and not r["count"]

    # Extra object: everything asked for is there, but the count is wrong.
    extra = S.Scene(target.objects + (("yellow", "triangle"),),
                    ((0, "to the left of", 1), (1, "to the left of", 2)))
    r = S.score(target, S.detect(_render(extra)))
    assert r["object"] == [True, True] and r["relation"] == [True] and not r["count"] and not r["all"]


def test_score_matching_prefers_exact_match():
    scene = S.Scene((("red", "circle"), ("red", "square")), ((0, "above", 1),))
    dets = [S.Detection("red", "square", 10.0, 25.0, 60), S.Detection("red", "circle", 10.0, 8.0, 40)]
    r = S.score(scene, dets)
    assert r["all"] and r["object"] == [True, True] and r["relation"] == [True]
    assert S.score(scene, [])["object"] == [False, False]


def test_inventories_of_up_to_six_objects_render_and_score_perfectly():
    src = S.ShapesSource(seed=1, max_objects=6)
    scenes = [src.example(i, uint8=True) for i in range(120)]
    counts = np.bincount([len(e["scene"].objects) for e in scenes], minlength=7)
    assert counts[0] == 0 and all(counts[1:] > 8)
    for e in scenes:
        scene = e["scene"]
        assert (len(scene.relations) == 0) == (len(scene.objects) in (1, 4, 5, 6))
        assert S.score(scene, S.detect(e["image"]))["all"], e["caption"]
    six = next(e for e in scenes if len(e["scene"].objects) == 6)["caption"]
    assert six.count(" and ") == 5
    with pytest.raises(ValueError, match="max_objects=7"):
        S.ShapesSource(max_objects=7)
    assert {len(s.objects) for s in (S.sample_scene(np.random.default_rng(k), "heldout", 6) for k in range(40))} \
        <= {2, 3}  # inventories hold no relation, so none is held out
