"""A harder suite of seeded scenes: hollow, thin, heavily occluded and nested objects.

The box prompt's failure (issue #15) needs cases the ordinary scenes (``scenes.py``) rarely
hold: an object that covers a small part of its own box, so a filled neighbour lying in the
box wins the paper's pixel-IoU rule. Each scene here holds a few ordinary *filler* shapes and
two to four *hard* objects, each tagged with its case:

* ``hollow``   — a thin ring or a square frame (its hole sometimes holds another object);
* ``thin``     — a bar (aspect 6–16, at least 5 px thick) at any angle;
* ``occluded`` — an ordinary shape with 50–80 % of its area hidden by a shape drawn over it
  (the visible part stays in one piece);
* ``nested``   — a small shape lying inside the box of a larger star, triangle or frame.

Seed ranges, disjoint from each other and from ``scenes.py``'s (training < 1,000,000, its
held-out 1,000,000+):

* ``DEV_SEED0``      2,000,000 .. 2,999,999: development (rules are designed on these);
* ``HELD_OUT_SEED0`` 3,000,000 +: held out (measured, never tuned on).

A scene is a deterministic function of its seed (numpy and OpenCV only). Objects keep at
least ``MIN_VISIBLE_PIXELS`` visible pixels in one connected piece, and differ in colour from
the objects they touch and from the background under them, as in ``scenes.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from fastsam_backend.quality.scenes import (
    COLOUR_JITTER,
    COLOURS,
    MIN_VISIBLE_PIXELS,
    Scene,
    SceneObject,
    _background,
    _shape_mask,
)

CASES: tuple[str, ...] = ("hollow", "thin", "occluded", "nested")
FILLER = "other"  # the case tag of filler objects
DEV_SEED0 = 2_000_000
HELD_OUT_SEED0 = 3_000_000
MIN_SIDE, MAX_SIDE = 320, 768
FILLER_SHAPES = ("circle", "square", "rectangle", "triangle", "star", "hexagon", "ellipse")
OCCLUDED_RANGE = (0.5, 0.8)  # hidden fraction of an ``occluded`` object
_MIN_BG_CONTRAST = 70.0


@dataclass(frozen=True, eq=False)
class HardScene(Scene):
    """A ``Scene`` whose objects carry a case tag and their full (unoccluded) area."""

    cases: tuple[str, ...] = ()  # per object: one of CASES, or FILLER
    full_areas: tuple[int, ...] = ()

    def of_case(self, case: str) -> list[int]:
        return [i for i, c in enumerate(self.cases) if c == case]


def dev_seeds(n: int, offset: int = 0) -> list[int]:
    return [DEV_SEED0 + offset + i for i in range(n)]


def held_out_hard_seeds(n: int, offset: int = 0) -> list[int]:
    return [HELD_OUT_SEED0 + offset + i for i in range(n)]


# ----------------------------------------------------------------------------- shapes


def _crop(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(bool)


def _ring(rng: np.random.Generator, size: float) -> np.ndarray:
    """A ring thinner than the training scenes' (inner radius 0.6–0.8 of the outer)."""
    canvas = math.ceil(size) + 6
    m = np.zeros((canvas, canvas), np.uint8)
    c, r = canvas / 2, size / 2
    cv2.circle(m, (round(c * 16), round(c * 16)), round(r * 16), 1, -1, cv2.LINE_8, 4)
    inner = max(r * rng.uniform(0.6, 0.8), 3.0)
    inner = min(inner, r - 4)  # at least 4 px of ring
    cv2.circle(m, (round(c * 16), round(c * 16)), round(inner * 16), 0, -1, cv2.LINE_8, 4)
    return _crop(m)


def _rotated_rect(h: float, w: float, angle: float, side: int | None = None) -> np.ndarray:
    """A filled ``w`` x ``h`` rectangle turned by ``angle`` (radians), centred on a square canvas."""
    side = side or math.ceil(math.hypot(h, w)) + 6
    m = np.zeros((side, side), np.uint8)
    pts = cv2.boxPoints(((side / 2, side / 2), (w, h), math.degrees(angle)))
    cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return m


def _frame(rng: np.random.Generator, size: float) -> np.ndarray:
    """A square or rectangular frame, border 10–20 % of its shorter side, slightly rotated."""
    aspect = rng.uniform(1.0, 1.8)
    w, h = size, size / aspect
    border = max(4.0, min(w, h) * rng.uniform(0.10, 0.20))
    angle = rng.uniform(-0.35, 0.35)
    outer = _rotated_rect(h, w, angle)
    inner = _rotated_rect(h - 2 * border, w - 2 * border, angle, outer.shape[0])
    return _crop(outer & (1 - inner))


def _bar(rng: np.random.Generator, length: float) -> np.ndarray:
    aspect = rng.uniform(6, 16)
    thick = max(5.0, length / aspect)
    return _crop(_rotated_rect(thick, length, rng.uniform(0, np.pi)))


# ----------------------------------------------------------------------------- placing


class _Canvas:
    """Objects placed so far: full masks (drawing order), their visible parts and tags."""

    def __init__(self, rng: np.random.Generator, h: int, w: int) -> None:
        self.rng, self.h, self.w = rng, h, w
        self.background = _background(rng, h, w)
        self.full: list[np.ndarray] = []
        self.visible: list[np.ndarray] = []
        self.meta: list[tuple[str, str, np.ndarray, str]] = []  # shape, colour, rgb, case
        self.min_keep: list[float] = []  # visible fraction of the full area each object must keep
        self._undo: tuple[int, list[np.ndarray]] = (0, [])  # before the last placement

    def place(self, crop: np.ndarray, shape: str, case: str, *, at: tuple[int, int] | None = None,
              keep: float = 0.7, may_cover: dict[int, tuple[float, float]] | None = None) -> int | None:
        """Put ``crop`` at ``at`` (top-left; random if None); None when it breaks a constraint.

        ``may_cover``: ``{index: (lo, hi)}``, objects this one must hide ``lo``–``hi`` of; every
        other earlier object must keep its ``min_keep`` fraction visible, in one piece.
        """
        ch, cw = crop.shape
        if ch >= self.h or cw >= self.w or crop.sum() < MIN_VISIBLE_PIXELS:
            return None
        if at is None:
            at = (int(self.rng.integers(0, self.w - cw + 1)), int(self.rng.integers(0, self.h - ch + 1)))
        x0, y0 = at
        if x0 < 0 or y0 < 0 or x0 + cw > self.w or y0 + ch > self.h:
            return None
        m = np.zeros((self.h, self.w), bool)
        m[y0:y0 + ch, x0:x0 + cw] = crop
        may_cover = may_cover or {}
        updated = {}
        for j, vj in enumerate(self.visible):
            hit = vj & m
            if not hit.any():
                if j in may_cover:
                    return None
                continue
            left = vj & ~m
            full = int(self.full[j].sum())
            if j in may_cover:
                lo, hi = may_cover[j]
                if not lo <= 1 - left.sum() / full <= hi:
                    return None
            elif left.sum() < self.min_keep[j] * full:
                return None
            if left.sum() < MIN_VISIBLE_PIXELS or not _one_piece(left):
                return None
            updated[j] = left
        colour = self._colour(m)
        if colour is None:
            return None
        self._undo = (len(self.full), list(self.visible))
        for j, left in updated.items():
            self.visible[j] = left
        rgb = np.clip(np.asarray(COLOURS[colour], np.float32)
                      + self.rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)
        self.full.append(m)
        self.visible.append(m.copy())
        self.meta.append((shape, colour, rgb, case))
        self.min_keep.append(keep)
        return len(self.full) - 1

    def _colour(self, m: np.ndarray) -> str | None:
        near = cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        touching = {self.meta[j][1] for j, vj in enumerate(self.visible) if (vj & near).any()}
        under = self.background[near]
        names = [name for name, rgb in COLOURS.items() if name not in touching
                 and np.percentile(np.linalg.norm(under - np.asarray(rgb, np.float32), axis=1), 5)
                 >= _MIN_BG_CONTRAST]
        return str(self.rng.choice(names)) if names else None

    def box(self, i: int) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.full[i])
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

    def render(self) -> HardScene:
        img = self.background
        for (_, _, rgb, _), m in zip(self.meta, self.full):
            ys, xs = np.nonzero(m)
            a = self.rng.uniform(0, 2 * np.pi)
            span = max(int(np.ptp(xs)), int(np.ptp(ys)), 1)
            t = ((xs - xs.min()) * math.cos(a) + (ys - ys.min()) * math.sin(a)) / span
            img[ys, xs] = rgb[None, :] + t[:, None] * self.rng.uniform(-15, 15)
        sigma = self.rng.uniform(0, 5)
        if sigma > 0.5:
            img = img + self.rng.normal(0, sigma, img.shape).astype(np.float32)
        image = np.clip(np.round(img), 0, 255).astype(np.uint8)
        objects = tuple(SceneObject(shape, colour, v) for (shape, colour, _, _), v in zip(self.meta, self.visible))
        return HardScene(image=image, objects=objects, cases=tuple(m[3] for m in self.meta),
                         full_areas=tuple(int(f.sum()) for f in self.full))


def _one_piece(mask: np.ndarray) -> bool:
    ys, xs = np.nonzero(mask)
    sub = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8)
    return cv2.connectedComponents(sub, connectivity=8)[0] == 2


# ----------------------------------------------------------------------------- cases


def _size(rng: np.random.Generator, side: int, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo * side), math.log(hi * side)))


def _filler(canvas: _Canvas, side: int, case: str = FILLER, keep: float = 0.7, lo: float = 0.08,
            hi: float = 0.3, at=None, may_cover=None, shape: str | None = None) -> int | None:
    shape = shape or str(canvas.rng.choice(FILLER_SHAPES))
    crop = _shape_mask(canvas.rng, shape, max(_size(canvas.rng, side, lo, hi), 18))
    return canvas.place(crop, shape, case, keep=keep, at=at, may_cover=may_cover)


def _inside(canvas: _Canvas, crop: np.ndarray, box: tuple[int, int, int, int]) -> tuple[int, int] | None:
    """A random top-left for ``crop`` within ``box``, or None if it does not fit."""
    x0, y0, x1, y1 = box
    ch, cw = crop.shape
    if x1 - x0 <= cw or y1 - y0 <= ch:
        return None
    return int(canvas.rng.integers(x0, x1 - cw)), int(canvas.rng.integers(y0, y1 - ch))


def _hollow(canvas: _Canvas, side: int) -> bool:
    rng = canvas.rng
    size = _size(rng, side, 0.25, 0.55)
    shape = "ring" if rng.random() < 0.5 else "frame"
    crop = _ring(rng, size) if shape == "ring" else _frame(rng, size)
    i = canvas.place(crop, shape, "hollow", keep=0.95)
    if i is None:
        return False
    if rng.random() < 0.6:  # something in the hole: the filled neighbour the paper's rule prefers
        x0, y0, x1, y1 = canvas.box(i)
        cx, cy, side_in = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0)
        shape = str(rng.choice(FILLER_SHAPES))
        small = _shape_mask(rng, shape, max(side_in * rng.uniform(0.25, 0.55), 16))
        at = (int(cx - small.shape[1] / 2), int(cy - small.shape[0] / 2))
        canvas.place(small, shape, FILLER, at=at)
    return True


def _thin(canvas: _Canvas, side: int) -> bool:
    return canvas.place(_bar(canvas.rng, _size(canvas.rng, side, 0.3, 0.75)), "bar", "thin", keep=0.95) is not None


def _occluded(canvas: _Canvas, side: int) -> bool:
    i = _filler(canvas, side, "occluded", keep=0.2, lo=0.12, hi=0.3)
    if i is None:
        return False
    x0, y0, x1, y1 = canvas.box(i)
    for _ in range(30):  # an occluder over it, hiding 50-80 %
        s = max(x1 - x0, y1 - y0) * canvas.rng.uniform(0.8, 1.5)
        shape = str(canvas.rng.choice(FILLER_SHAPES))
        crop = _shape_mask(canvas.rng, shape, s)
        cx = canvas.rng.uniform(x0, x1) - crop.shape[1] / 2
        cy = canvas.rng.uniform(y0, y1) - crop.shape[0] / 2
        if canvas.place(crop, shape, FILLER, at=(int(cx), int(cy)), may_cover={i: OCCLUDED_RANGE}) is not None:
            return True
    _drop_last(canvas)
    return False


def _nested(canvas: _Canvas, side: int) -> bool:
    rng = canvas.rng
    outer = str(rng.choice(("star", "triangle", "frame")))
    size = _size(rng, side, 0.35, 0.6)
    crop = _frame(rng, size) if outer == "frame" else _shape_mask(rng, outer, size)
    i = canvas.place(crop, outer, FILLER, keep=0.8)
    if i is None:
        return False
    box = canvas.box(i)
    for _ in range(30):  # a small shape inside that box, not on the outer one
        shape = str(rng.choice(FILLER_SHAPES))
        small = _shape_mask(rng, shape, max(_size(rng, side, 0.06, 0.14), 18))
        at = _inside(canvas, small, box)
        if at is None:
            break
        m = np.zeros_like(canvas.full[i])
        m[at[1]:at[1] + small.shape[0], at[0]:at[0] + small.shape[1]] = small
        if (m & canvas.full[i]).any():  # in the box, not on the object
            continue
        if canvas.place(small, shape, "nested", at=at, keep=0.9) is not None:
            return True
    _drop_last(canvas)
    return False


def _drop_last(canvas: _Canvas) -> None:
    """Undo the last placement (a case that could not be completed), restoring what it hid."""
    n, visible = canvas._undo
    del canvas.full[n:], canvas.meta[n:], canvas.min_keep[n:]
    canvas.visible = visible


_MAKERS = {"hollow": _hollow, "thin": _thin, "occluded": _occluded, "nested": _nested}


def generate_hard_scene(seed: int) -> HardScene:
    """The hard scene of ``seed`` (each of ``CASES`` is tried in a random subset of 2–4)."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    canvas = _Canvas(rng, h, w)
    side = min(h, w)
    for _ in range(int(rng.integers(1, 4))):
        _filler(canvas, side)
    cases = list(rng.permutation(CASES)[: int(rng.integers(2, 5))])
    for case in cases:
        for _ in range(8):
            if _MAKERS[str(case)](canvas, side):
                break
    for _ in range(int(rng.integers(0, 3))):
        _filler(canvas, side, lo=0.05, hi=0.15)
    return canvas.render()
