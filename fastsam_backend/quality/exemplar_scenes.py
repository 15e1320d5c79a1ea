"""Seeded scenes with a repeated kind and its look-alikes, for exemplar prompts (issue #26).

Each scene holds one *target* kind (a shape in a colour) 3–5 times, at slightly varying sizes
(±15 % around one size), and distractors of three types:

- ``same_shape``: the target's shape in another colour (2–3 of them);
- ``same_colour``: another shape in the target's colour (2–3);
- ``other``: another shape in another colour (1–3).

Objects do not overlap (each keeps a margin), so each ground-truth mask is the whole object; the
background, shading and noise are ``scenes``' (plain, gradient, noise, stripes or checks; clutter).
An object's colour differs from the background under it, as in ``scenes.generate_scene``.

Seed ranges, disjoint from each other and from ``scenes``' training and validation ranges:

* ``DEV_SEED0 ..``      development scenes (the similarity's scales and cut were chosen on these),
* ``HELDOUT_SEED0 ..``  held-out scenes (measured only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from fastsam_backend.quality.scenes import COLOUR_JITTER, COLOURS, SHAPES, _background, _shape_mask

DEV_SEED0 = 2_600_000
HELDOUT_SEED0 = 2_700_000
DISTRACTOR_TYPES = ("same_shape", "same_colour", "other")
_MIN_BG_CONTRAST = 70.0
_MARGIN = 6  # px between objects


@dataclass(frozen=True, eq=False)
class KindObject:
    shape: str
    colour: str
    role: str  # "target" or one of DISTRACTOR_TYPES
    mask: np.ndarray  # (H, W) bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True, eq=False)
class KindScene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: tuple[KindObject, ...]
    shape: str  # the target kind
    colour: str

    @property
    def targets(self) -> tuple[KindObject, ...]:
        return tuple(o for o in self.objects if o.role == "target")

    @property
    def caption(self) -> str:
        return f"{self.colour} {self.shape}"


def _plan(rng: np.random.Generator) -> tuple[str, str, list[tuple[str, str, str]]]:
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    other_shapes = [s for s in SHAPES if s != shape]
    other_colours = [c for c in COLOURS if c != colour]
    plan = [(shape, colour, "target")] * int(rng.integers(3, 6))
    plan += [(shape, str(rng.choice(other_colours)), "same_shape") for _ in range(int(rng.integers(2, 4)))]
    plan += [(str(rng.choice(other_shapes)), colour, "same_colour") for _ in range(int(rng.integers(2, 4)))]
    plan += [(str(rng.choice(other_shapes)), str(rng.choice(other_colours)), "other")
             for _ in range(int(rng.integers(1, 4)))]
    return shape, colour, plan


def generate_kind_scene(seed: int) -> KindScene:
    """The scene of ``seed`` (deterministic: numpy and OpenCV only). A draw that could not place
    3 targets and a distractor of each type (a background too close to their colour) is drawn
    again from the same generator."""
    rng = np.random.default_rng(seed)
    while True:
        scene = _draw(rng)
        roles = [o.role for o in scene.objects]
        if roles.count("target") >= 3 and all(kind in roles for kind in DISTRACTOR_TYPES):
            return scene


def _draw(rng: np.random.Generator) -> KindScene:
    h, w = int(rng.integers(512, 769)), int(rng.integers(512, 769))
    background = _background(rng, h, w)
    shape, colour, plan = _plan(rng)
    n = len(plan)
    # one size for the kind, objects within ±15 % of it; sized so that n objects fit with room to spare
    base = math.sqrt(h * w / n) * rng.uniform(0.35, 0.5)
    taken = np.zeros((h, w), bool)
    objects: list[tuple[KindObject, np.ndarray]] = []
    for want_shape, want_colour, role in plan:
        for _ in range(200):
            crop = _shape_mask(rng, want_shape, base * rng.uniform(0.85, 1.15))
            ch, cw = crop.shape
            if ch >= h or cw >= w:
                continue
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            m = np.zeros((h, w), bool)
            m[y0:y0 + ch, x0:x0 + cw] = crop
            grown = cv2.dilate(m.astype(np.uint8), np.ones((2 * _MARGIN + 1,) * 2, np.uint8)).astype(bool)
            if (grown & taken).any():
                continue
            under = background[grown & ~m]
            rgb = np.asarray(COLOURS[want_colour], np.float32)
            if np.percentile(np.linalg.norm(under - rgb, axis=1), 5) < _MIN_BG_CONTRAST:
                continue
            taken |= m
            shade = np.clip(rgb + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)
            objects.append((KindObject(want_shape, want_colour, role, m), shade))
            break
    img = background
    for obj, rgb in objects:
        x0, y0, x1, y1 = obj.box
        a = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        t = ((xx - x0) * math.cos(a) + (yy - y0) * math.sin(a)) / max(x1 - x0, y1 - y0)
        shade = rgb[None, None, :] + t[..., None] * rng.uniform(-15, 15)
        sub, mm = img[y0:y1, x0:x1], obj.mask[y0:y1, x0:x1]
        sub[mm] = shade[mm]
    sigma = rng.uniform(0, 6)
    if sigma > 0.5:
        img = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return KindScene(image, tuple(o for o, _ in objects), shape, colour)


def dev_seeds(n: int) -> list[int]:
    return [DEV_SEED0 + i for i in range(n)]


def heldout_seeds(n: int) -> list[int]:
    return [HELDOUT_SEED0 + i for i in range(n)]


def crowded_kind_scene(seed: int, n: int = 100, side: int = 1024, repeats: int = 20) -> KindScene:
    """``n`` objects on a grid of a ``side``² image, ``repeats`` of them of one kind, the rest of random
    other kinds (the benchmark's image with "about 100" cached instances; ``bench/exemplars.py``)."""
    rng = np.random.default_rng(seed)
    cells = math.ceil(math.sqrt(n))
    cell = side // cells
    image = np.full((side, side, 3), 128, np.float32)
    shape, colour = "star", "red"
    kinds = [(shape, colour)] * repeats + [
        (str(rng.choice([s for s in SHAPES if s != shape])), str(rng.choice([c for c in COLOURS if c != colour])))
        for _ in range(n - repeats)]
    order = rng.permutation(n)
    objects = []
    for slot, k in enumerate(order):
        kind_shape, kind_colour = kinds[k]
        crop = _shape_mask(rng, kind_shape, cell * rng.uniform(0.55, 0.7))
        ch, cw = crop.shape
        y0, x0 = (slot // cells) * cell + (cell - ch) // 2, (slot % cells) * cell + (cell - cw) // 2
        m = np.zeros((side, side), bool)
        m[y0:y0 + ch, x0:x0 + cw] = crop
        image[m] = np.asarray(COLOURS[kind_colour], np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
        objects.append(KindObject(kind_shape, kind_colour, "target" if k < repeats else "other", m))
    return KindScene(image.clip(0, 255).astype(np.uint8), tuple(objects), shape, colour)
