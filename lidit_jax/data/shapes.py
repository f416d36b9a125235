"""Procedural "coloured shapes" demo dataset, with held-out compositions and a detector/scorer.

Images are small RGB renders of one to three coloured shapes on a plain dark background, with
captions such as "a red circle to the left of a blue square"; with `max_objects` 4 to 6, also inventories of
four to six shapes without relations ("a red circle and a blue square and ..."), for the positional-bias study.
Everything is deterministic given a seed. Held-out prompts are defined at the level of pairwise layout facts
("red circle left of blue square"): a held-out fact never appears anywhere in a training image, stated or implied, so
evaluating on held-out scenes measures genuine compositional generalisation.

The detector is deliberately cheap and robust (generated images are blurry and noisy): each pixel
is projected onto the palette directions relative to the background, kept only when it is clearly
one colour, grouped into connected components, and classified by simple geometry.

numpy + PIL only: this module is used by data loading and evaluation, which must not need jax.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours, far apart in hue, so that blending towards the background never turns one
# palette colour into another.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (45, 200, 70),
    "blue": (55, 95, 240),
    "yellow": (235, 215, 50),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
BACKGROUND: tuple[int, int, int] = (16, 16, 24)

# Relation -> (axis, sign): axis 0 is x (right), 1 is y (down); "a left of b" means
# sign * (centre_b - centre_a) > 0 along the axis.
REL_GEOMETRY = {
    "to the left of": (0, 1.0),
    "to the right of": (0, -1.0),
    "above": (1, 1.0),
    "below": (1, -1.0),
}
# Each relation's mirror image, used to put layout facts in one canonical direction.
_INVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}

# Fraction of canonical pairwise layout facts that are held out. 2-object scenes are held out at
# about this rate; 3-object scenes contain three facts (two stated, one implied), so about
# 1 - 0.9**3 ~ 27% of them are held out.
HELDOUT_FRACTION = 0.1
_HELDOUT_SALT = "lidit-shapes-heldout-v1"

N_TEMPLATES = 3
_TEMPLATES_1 = ("a {0}", "there is a {0}", "a single {0}")
_TEMPLATES_2 = ("a {0} {r0} a {1}", "there is a {0} {r0} a {1}", "a {0} is {r0} a {1}")
_TEMPLATES_3 = (
    "a {0} {r0} a {1} {r1} a {2}",
    "a {0} {r0} a {1} and the {1} {r1} a {2}",
    "a {0} is {r0} a {1} which is {r1} a {2}",
)

VOCABULARY: tuple[str, ...] = tuple(sorted(
    set(COLOURS)
    | set(SHAPES)
    | {w for rel in RELATIONS for w in rel.split()}
    | {"a", "the", "there", "is", "single", "and", "which"}
))


# ----------------------------------------------------------------------------------------------
# Scenes and captions
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[tuple[str, str], ...]          # (colour, shape), in caption order
    relations: tuple[tuple[int, str, int], ...] = ()  # (i, relation, j): objects[i] <rel> objects[j]

    def __post_init__(self):
        objects = tuple((str(c), str(s)) for c, s in self.objects)
        relations = tuple((int(i), str(r), int(j)) for i, r, j in self.relations)
        object.__setattr__(self, "objects", objects)
        object.__setattr__(self, "relations", relations)
        if not objects:
            raise ValueError("a scene needs at least one object")
        for colour, shape in objects:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"unknown object {colour!r} {shape!r}")
        # Duplicate (colour, shape) pairs would make captions and scoring ambiguous.
        if len(set(objects)) != len(objects):
            raise ValueError(f"duplicate object in {objects}")
        for i, rel, j in relations:
            if rel not in RELATIONS or not (0 <= i < len(objects)) or not (0 <= j < len(objects)) or i == j:
                raise ValueError(f"bad relation {(i, rel, j)} for {len(objects)} objects")

    def _is_chain(self) -> bool:
        return len(self.relations) == len(self.objects) - 1 and all(
            i == k and j == k + 1 for k, (i, _, j) in enumerate(self.relations))

    def caption(self, template: int = 0) -> str:
        if not 0 <= template < N_TEMPLATES:
            raise ValueError(f"template must be in [0, {N_TEMPLATES})")
        names = [f"{c} {s}" for c, s in self.objects]
        rels = {f"r{k}": r for k, (_, r, _) in enumerate(self.relations)}
        n = len(names)
        if n == 1:
            return _TEMPLATES_1[template].format(*names)
        if self._is_chain() and n in (2, 3):
            return (_TEMPLATES_2 if n == 2 else _TEMPLATES_3)[template].format(*names, **rels)
        # Hand-built scenes outside the sampled scheme: one clause per relation, "a" on first
        # mention and "the" afterwards, then any object not in a relation.
        seen: set[int] = set()

        def mention(k: int) -> str:
            article = "the" if k in seen else "a"
            seen.add(k)
            return f"{article} {names[k]}"

        clauses = [f"{mention(i)} {r} {mention(j)}" for i, r, j in self.relations]
        clauses += [mention(k) for k in range(n) if k not in seen]
        return " and ".join(clauses)


_ALL_OBJECTS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)


def _layout_facts(scene: Scene) -> frozenset[tuple[tuple[str, str], str, tuple[str, str]]]:
    """Canonical pairwise facts ("left of" / "above" only), closed under transitivity.

    "A right of B" and "B left of A" describe the same picture, so both map to the same fact;
    "A left of B left of C" also shows "A left of C", which is included so that a held-out fact
    cannot leak into training through an unstated implication.
    """
    facts = set()
    for i, rel, j in scene.relations:
        if rel in ("to the right of", "below"):
            i, rel, j = j, _INVERSE[rel], i
        facts.add((i, rel, j))
    changed = True
    while changed:
        changed = False
        for a, r1, b in list(facts):
            for b2, r2, c in list(facts):
                if b == b2 and r1 == r2 and a != c and (a, r1, c) not in facts:
                    facts.add((a, r1, c))
                    changed = True
    return frozenset((scene.objects[a], r, scene.objects[b]) for a, r, b in facts)


def _fact_is_heldout(fact) -> bool:
    (c1, s1), rel, (c2, s2) = fact
    key = f"{_HELDOUT_SALT}|{c1} {s1}|{rel}|{c2} {s2}".encode()
    value = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return value < HELDOUT_FRACTION * 2.0 ** 64


def is_heldout(scene: Scene) -> bool:
    """True when any pairwise layout fact of the scene is held out (never for 1-object scenes).

    Depends only on (objects, relations) through their canonical facts, never on the caption
    template, and uses sha256 so it is stable across processes and Python versions.
    """
    return any(_fact_is_heldout(f) for f in _layout_facts(scene))


def heldout_facts() -> list[tuple[tuple[str, str], str, tuple[str, str]]]:
    """All held-out canonical facts ((colour, shape), "to the left of" | "above", (colour, shape))."""
    return [(a, rel, b) for a in _ALL_OBJECTS for b in _ALL_OBJECTS if a != b
            for rel in ("to the left of", "above") if _fact_is_heldout((a, rel, b))]


MAX_OBJECTS = 6  # a 3 x 3 grid of 7 px cells at 32 px holds six with room to choose


def _object_count_probs(split: str, max_objects: int, object_weights) -> np.ndarray:
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects={max_objects}: must be 1 to {MAX_OBJECTS}")
    if object_weights is None:
        w = np.ones(max_objects)
    else:
        w = np.asarray(object_weights, dtype=np.float64)[:max_objects].copy()
        if len(w) < max_objects:
            raise ValueError("object_weights needs one weight per object count")
    if split == "heldout":
        w[0] = 0.0  # single objects cannot be held out
        w[3:] = 0.0  # nor inventories (no relations)
    if w.sum() <= 0:
        raise ValueError(f"no object count is possible for split {split!r}, max_objects={max_objects}")
    return w / w.sum()


def sample_scene(rng: np.random.Generator, split: str = "train", max_objects: int = 3,
                 object_weights: Sequence[float] | None = None) -> Scene:
    """Sample a scene of the given split. `object_weights[k]` weighs k+1 objects (default uniform).

    2 objects: one relation. 3 objects: a row or column chain, (0, r, 1) and (1, r, 2) with the same
    relation r, which is always satisfiable at 32 px. 4 to 6 objects: an inventory, no relations.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    probs = _object_count_probs(split, max_objects, object_weights)
    want_heldout = split == "heldout"
    # Rejection keeps each split's conditional distribution otherwise unchanged.
    for _ in range(10_000):
        n = int(rng.choice(len(probs), p=probs)) + 1
        picks = rng.choice(len(_ALL_OBJECTS), size=n, replace=False)
        objects = tuple(_ALL_OBJECTS[int(k)] for k in picks)
        if n == 1 or n > 3:
            relations = ()
        elif n == 2:
            relations = ((0, RELATIONS[int(rng.integers(len(RELATIONS)))], 1),)
        else:
            rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
            relations = ((0, rel, 1), (1, rel, 2))
        scene = Scene(objects, relations)
        if is_heldout(scene) == want_heldout:
            return scene
    raise RuntimeError("could not sample a scene for the split")  # practically unreachable


def heldout_scenes(n: int, seed: int = 0, min_objects: int = 2) -> list[Scene]:
    """A deterministic list of `n` held-out scenes with min_objects..3 objects (duplicates possible)."""
    if min_objects not in (2, 3):
        raise ValueError("held-out scenes have 2 or 3 objects")
    weights = [0.0, 1.0, 1.0] if min_objects == 2 else [0.0, 0.0, 1.0]
    rng = np.random.default_rng([seed, 0x5EED])
    return [sample_scene(rng, "heldout", 3, weights) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
_SUPERSAMPLE = 4   # draw at 4x and box-filter down: soft, anti-aliased edges
_MARGIN = 1        # pixels kept free at the image border


def _geometry(size: int) -> tuple[int, int, int, float]:
    """(min object size, max object size, min gap, min centre separation) for an image size."""
    smin = max(3, round(size * 7 / 32))
    smax = max(smin, round(size * 11 / 32))
    gap = max(2, round(size * 3 / 32))  # 3 px at 32: survives a slight blur without merging
    return smin, smax, gap, size / 4


def _axis_order(n: int, edges: list[tuple[int, int]]) -> list[int] | None:
    """Topological order of objects given (before, after) edges; None on a contradiction."""
    indeg = [0] * n
    succ: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
    ready = [k for k in range(n) if indeg[k] == 0]
    order = []
    while ready:
        k = ready.pop(0)
        order.append(k)
        for b in succ[k]:
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
    return order if len(order) == n else None


def _layout_valid(scene: Scene, boxes: np.ndarray, size: int) -> bool:
    _, _, gap, min_sep = _geometry(size)
    x0, y0, s = boxes[:, 0], boxes[:, 1], boxes[:, 2]
    if (x0 < _MARGIN).any() or (y0 < _MARGIN).any() or (x0 + s > size - _MARGIN).any() \
            or (y0 + s > size - _MARGIN).any():
        return False
    n = len(boxes)
    for a in range(n):
        for b in range(a + 1, n):
            xgap = max(x0[b] - (x0[a] + s[a]), x0[a] - (x0[b] + s[b]))
            ygap = max(y0[b] - (y0[a] + s[a]), y0[a] - (y0[b] + s[b]))
            if max(xgap, ygap) < gap:
                return False
    centres = np.stack([x0 + s / 2, y0 + s / 2], axis=1)
    for i, rel, j in scene.relations:
        axis, sign = REL_GEOMETRY[rel]
        main = sign * (centres[j, axis] - centres[i, axis])
        cross = abs(centres[j, 1 - axis] - centres[i, 1 - axis])
        # A clear margin: far apart along the axis, and the other axis at most half as far,
        # so "left of" never also reads as "above".
        if main < min_sep or cross > 0.5 * main:
            return False
    return True


def _propose(scene: Scene, rng: np.random.Generator, size: int) -> np.ndarray | None:
    """One candidate layout, int boxes [n, 3] = (x0, y0, side), or None if the sides cannot fit."""
    smin, smax, gap, _ = _geometry(size)
    n = len(scene.objects)
    if n > 3 and not scene.relations:
        return _propose_grid(n, rng, size, smin, gap)
    axes = {REL_GEOMETRY[r][0] for _, r, _ in scene.relations}
    if len(axes) == 1:
        # A row or column must fit n objects and their gaps: cap the side so that most
        # proposals fit (3 objects at 32 px: 7-8 px).
        smax = max(smin, min(smax, (size - 2 * _MARGIN - (n - 1) * gap) // n))
    sides = rng.integers(smin, smax + 1, size=n)
    boxes = np.zeros((n, 3), dtype=np.int64)
    boxes[:, 2] = sides
    for axis in (0, 1):
        span = size - 2 * _MARGIN
        if axes == {axis}:
            # Objects ordered along this axis: spread the free space randomly between them.
            edges = []
            for i, rel, j in scene.relations:
                edges.append((i, j) if REL_GEOMETRY[rel][1] > 0 else (j, i))
            order = _axis_order(n, edges)
            if order is None:
                raise ValueError(f"contradictory relations in {scene}")
            slack = span - int(sides.sum()) - (n - 1) * gap
            if slack < 0:
                return None
            cuts = np.floor(rng.dirichlet(np.ones(n + 1)) * slack).astype(np.int64)
            pos = _MARGIN + cuts[0]
            for rank, k in enumerate(order):
                boxes[k, axis] = pos
                pos += sides[k] + gap + cuts[rank + 1]
        else:
            for k in range(n):
                boxes[k, axis] = rng.integers(_MARGIN, size - _MARGIN - sides[k] + 1)
    return boxes


def _propose_grid(n: int, rng: np.random.Generator, size: int, smin: int, gap: int) -> np.ndarray:
    """Inventories: n of the 3 x 3 grid's cells, each shape of the smallest side jittered inside its cell (free
    placement rarely fits six shapes with their gaps)."""
    cell = (size - 2 * _MARGIN + gap) // 3  # 11 at 32 px: side 7 + gap 3, and 1 px to jitter
    side = max(1, min(smin, cell - gap))
    boxes = np.zeros((n, 3), dtype=np.int64)
    for k, c in enumerate(rng.choice(9, size=n, replace=False)):
        row, col = divmod(int(c), 3)
        boxes[k] = (_MARGIN + col * cell + rng.integers(0, cell - gap - side + 1),
                    _MARGIN + row * cell + rng.integers(0, cell - gap - side + 1), side)
    return boxes


def layout(scene: Scene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Boxes [n, 3] = (x0, y0, side) in pixels satisfying every constraint; retries with `rng`."""
    for _ in range(5000):
        boxes = _propose(scene, rng, size)
        if boxes is not None and _layout_valid(scene, boxes, size):
            return boxes
    raise RuntimeError(f"could not place {scene} at size {size}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, colour) -> None:
    x0, y0, s = (int(v) * _SUPERSAMPLE for v in box)
    x1, y1 = x0 + s - 1, y0 + s - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    else:  # upward-pointing isosceles triangle filling its box
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)


def render(scene: Scene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Render the scene as uint8 [size, size, 3]; deterministic given the rng state."""
    boxes = layout(scene, rng, size)
    big = Image.new("RGB", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for (colour, shape), box in zip(scene.objects, boxes):
        _draw(draw, shape, box, COLOURS[colour])
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.uint8).copy()


# ----------------------------------------------------------------------------------------------
# Dataset source
# ----------------------------------------------------------------------------------------------
_SPLIT_IDS = {"train": 0, "heldout": 1}


class ShapesSource:
    """Deterministic, index-addressable: example i depends only on (seed, split, i)."""

    def __init__(self, size: int = 32, seed: int = 0, split: str = "train", max_objects: int = 3,
                 object_weights=None):
        """`object_weights[k]` weighs k+1 objects; default 0.2 / 0.45 / 0.35 up to three, uniform beyond."""
        if object_weights is None:
            object_weights = (0.2, 0.45, 0.35) if max_objects <= 3 else (1.0,) * max_objects
        if split not in _SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}")
        _object_count_probs(split, max_objects, object_weights)  # validate early
        self.size, self.seed, self.split = size, seed, split
        self.max_objects, self.object_weights = max_objects, tuple(object_weights)

    def _scene(self, index: int):
        if index < 0:
            raise IndexError(index)
        # A fresh generator per example, keyed on (seed, split, index): random access and
        # identical data regardless of batch size, order or sharding.
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(index)])
        scene = sample_scene(rng, self.split, self.max_objects, self.object_weights)
        return rng, scene, scene.caption(int(rng.integers(N_TEMPLATES)))

    def caption(self, index: int) -> str:
        """Example `index`'s caption, without rendering its image."""
        return self._scene(index)[2]

    def example(self, index: int, uint8: bool = False) -> dict:
        """The rendered image in [-1, 1] (float32), or as the bytes it was drawn in (`uint8=True`)."""
        rng, scene, caption = self._scene(index)
        image = render(scene, rng, self.size)
        if not uint8:
            image = image.astype(np.float32) / 127.5 - 1.0
        return {"image": image, "caption": caption, "scene": scene}

    def batch(self, start: int, batch_size: int, uint8: bool = False) -> dict:
        examples = [self.example(start + k, uint8) for k in range(batch_size)]
        return {"image": np.stack([e["image"] for e in examples]),
                "caption": [e["caption"] for e in examples]}


# ----------------------------------------------------------------------------------------------
# Detector and scorer
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    cx: float   # pixels, x to the right
    cy: float   # pixels, y downwards
    area: int


MIN_AREA = 6          # components smaller than this are specks
_MIN_ALPHA = 0.5      # pixel must be at least half-way from the background to its palette colour
_MIN_COSINE = 0.9     # ... and point clearly in a palette colour's direction (not grey/noise)
_COLOUR_NAMES = tuple(COLOURS)
_BG = np.asarray(BACKGROUND, dtype=np.float32)
_DIRS = np.asarray([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32) - _BG   # [K, 3]


def _to_uint8_range(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected [H, W, 3], got {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32)
    return (np.clip(img.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5


def classify_pixels(image) -> np.ndarray:
    """Palette index per pixel, -1 for background. int [H, W].

    A pixel blended between the background b and colour c is b + a (c - b), so its offset from the
    background points along (c - b) whatever the blend: the cosine picks the colour, the
    projection `a` says how much of it is there.
    """
    offset = _to_uint8_range(image) - _BG                      # [H, W, 3]
    dots = offset @ _DIRS.T                                    # [H, W, K]
    norms = np.linalg.norm(offset, axis=-1, keepdims=True) * np.linalg.norm(_DIRS, axis=-1)
    cosine = dots / np.maximum(norms, 1e-6)
    best = cosine.argmax(-1)
    alpha = np.take_along_axis(dots, best[..., None], -1)[..., 0] / (_DIRS ** 2).sum(-1)[best]
    keep = (alpha >= _MIN_ALPHA) & (cosine.max(-1) >= _MIN_COSINE)
    return np.where(keep, best, -1)


def _components(labels: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """4-connected components of equal non-negative labels: (label, ys, xs). Small BFS; images are tiny."""
    h, w = labels.shape
    seen = np.zeros((h, w), dtype=bool)
    out = []
    for y, x in zip(*np.nonzero(labels >= 0)):
        if seen[y, x]:
            continue
        lab = labels[y, x]
        seen[y, x] = True
        queue, ys, xs = deque([(y, x)]), [], []
        while queue:
            cy, cx = queue.popleft()
            ys.append(cy)
            xs.append(cx)
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and labels[ny, nx] == lab:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append((int(lab), np.asarray(ys), np.asarray(xs)))
    return out


def _classify_shape(ys: np.ndarray, xs: np.ndarray) -> str:
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    # An upward triangle keeps only ~1/4 of its pixels above the middle of its box (circles and
    # squares: 1/2). The middle row counts half, so odd heights do not bias it.
    mid = (y0 + y1) / 2.0
    top_share = ((ys < mid).sum() + 0.5 * (ys == mid).sum()) / len(ys)
    if top_share < 0.42:
        return "triangle"
    # Square (fill 1.0) vs circle (~0.785) by fill ratio of the box. Noise leaves single-pixel
    # bumps on the outline that inflate a plain bounding box, so the box only spans rows and
    # columns holding at least 20% of the widest one's pixels (and at least 2).
    rows, cols = np.bincount(ys - y0), np.bincount(xs - x0)
    r = np.nonzero(rows >= max(2.0, 0.2 * rows.max()))[0]
    c = np.nonzero(cols >= max(2.0, 0.2 * cols.max()))[0]
    if len(r) and len(c):
        y0, y1, x0, x1 = y0 + r[0], y0 + r[-1], x0 + c[0], x0 + c[-1]
    inside = ((ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)).sum()
    fill = inside / float((y1 - y0 + 1) * (x1 - x0 + 1))
    return "square" if fill >= 0.86 else "circle"


def detect(image, min_area: int = MIN_AREA) -> list[Detection]:
    """Detect coloured shapes in uint8 [H, W, 3] or float [-1, 1] images, largest first."""
    labels = classify_pixels(image)
    dets = []
    for lab, ys, xs in _components(labels):
        if len(ys) < min_area:
            continue
        dets.append(Detection(colour=_COLOUR_NAMES[lab], shape=_classify_shape(ys, xs),
                              cx=float(xs.mean()) + 0.5, cy=float(ys.mean()) + 0.5, area=len(ys)))
    dets.sort(key=lambda d: -d.area)
    return dets


def relation_holds(rel: str, a: Detection, b: Detection, min_sep: float = 2.0) -> bool:
    """`a <rel> b` for detected centres: at least `min_sep` px apart along the relation's axis and
    further apart along it than across it (more lenient than the renderer's margin)."""
    axis, sign = REL_GEOMETRY[rel]
    pa, pb = (a.cx, a.cy), (b.cx, b.cy)
    main = sign * (pb[axis] - pa[axis])
    cross = abs(pb[1 - axis] - pa[1 - axis])
    return main >= min_sep and main > cross


def score(scene: Scene, detections: Iterable[Detection]) -> dict:
    """Match each object phrase to one detection (no reuse) and check attributes and relations.

    Matching is greedy in three passes, exact (colour and shape) first, then same colour, then
    same shape; within a pass the largest unused detection wins.
    """
    dets = sorted(detections, key=lambda d: -d.area)
    n = len(scene.objects)
    match: list[Detection | None] = [None] * n
    used = [False] * len(dets)
    passes = (lambda o, d: o == (d.colour, d.shape),
              lambda o, d: o[0] == d.colour,
              lambda o, d: o[1] == d.shape)
    for fits in passes:
        for k, obj in enumerate(scene.objects):
            if match[k] is not None:
                continue
            for m, d in enumerate(dets):
                if not used[m] and fits(obj, d):
                    match[k], used[m] = d, True
                    break
    colour = [m is not None and m.colour == o[0] for o, m in zip(scene.objects, match)]
    shape = [m is not None and m.shape == o[1] for o, m in zip(scene.objects, match)]
    obj_ok = [c and s for c, s in zip(colour, shape)]
    relation = [match[i] is not None and match[j] is not None and relation_holds(r, match[i], match[j])
                for i, r, j in scene.relations]
    count = len(dets) == n
    return {"colour": colour, "shape": shape, "object": obj_ok, "relation": relation,
            "count": count, "all": bool(all(obj_ok) and all(relation) and count)}
