"""Seeded synthetic scenes of coloured shapes, with exact per-object masks.

The test-suite cannot download FastSAM or CLIP weights, so it ships two tiny
fixture models (``tests/fixtures/models/``) trained from scratch on these scenes
(``scripts/train_fastsam_fixture.py``, ``scripts/train_clip_fixture.py``) and
measures mask quality against the ground truth this module returns.

Seed ranges (keep them disjoint, the fixtures' quality numbers depend on it):

* ``0 .. 99_999``           training scenes,
* ``500_000 .. 999_999``    validation scenes (model selection during training),
* ``>= 1_000_000``          held-out test scenes (the test-suite uses ``1_000_000 +``).

A scene is a deterministic function of its seed (``numpy.random.default_rng``),
numpy and OpenCV only. Each image is 256–1024 px a side (possibly non-square),
holds 2–15 objects of 8 shapes and 8 colours whose size is 3 %–50 % of the
shorter image side, drawn in order so later objects occlude earlier ones, over a
background that is plain, a gradient, noise, stripes or checks, often with
clutter (thin lines, small specks) that is not an object. Objects are placed so
that every drawn object keeps at least :data:`MIN_VISIBLE_FRACTION` of its area
and :data:`MIN_VISIBLE_PIXELS` pixels visible in one connected piece (holes
allowed), and so that touching objects and the background under an object
differ in colour: every drawn object is a ground-truth object, and its visible
boundary can be seen in the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "rectangle", "triangle", "star", "hexagon", "ellipse", "ring")
# Drawn only when asked for (``generate_scene(..., shapes=NEW_SHAPES)``): no fixture was trained on them,
# so they measure fine-tuning on an object kind the base model never saw (docs/fine-tuning.md).
NEW_SHAPES: tuple[str, ...] = ("cross", "crescent")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (140, 50, 180),
    "white": (220, 220, 220),  # light grey: stays visible on a whitened CLIP crop
    "black": (20, 20, 20),
}

MIN_SIDE, MAX_SIDE = 256, 1024
MIN_OBJECTS, MAX_OBJECTS = 2, 15
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.03, 0.50
MIN_SIZE_PIXELS = 16  # smallest object extent; specks are far smaller
MIN_VISIBLE_FRACTION = 0.30
MIN_VISIBLE_PIXELS = 120
COLOUR_JITTER = 18  # per channel, uniform +-
_MIN_BG_CONTRAST = 70.0  # RGB distance between an object colour and the background under it


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One visible object: ``mask`` is the VISIBLE part only (after occlusion), (H, W) bool."""

    shape: str
    colour: str
    mask: np.ndarray

    @property
    def caption(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Tight box of the visible mask, ``x0, y0, x1, y1`` with ``x1, y1`` exclusive."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True, eq=False)
class Scene:
    """``image``: (H, W, 3) uint8 RGB; ``objects``: the visible objects, in drawing order."""

    image: np.ndarray
    objects: tuple[SceneObject, ...]


# ----------------------------------------------------------------------------- shapes


def _regular_polygon(n: int, radius: float, angle: float) -> np.ndarray:
    t = angle + np.arange(n) * 2 * np.pi / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _shape_mask(rng: np.random.Generator, shape: str, size: float) -> np.ndarray:
    """Full mask of one shape whose larger extent is about ``size`` px, tightly cropped."""
    pad = 2
    canvas = math.ceil(size * 1.05) + 2 * pad + 2
    c = canvas / 2.0
    m = np.zeros((canvas, canvas), np.uint8)
    angle = rng.uniform(0, 2 * np.pi)
    shift = 4  # sub-pixel precision for polygons
    scale = 1 << shift

    def poly(points: np.ndarray) -> None:
        pts = np.round((points + c) * scale).astype(np.int32)
        cv2.fillPoly(m, [pts], 1, lineType=cv2.LINE_8, shift=shift)

    def rotated(points: np.ndarray) -> np.ndarray:
        ca, sa = math.cos(angle), math.sin(angle)
        return points @ np.array([[ca, sa], [-sa, ca]])

    r = size / 2.0
    if shape == "circle":
        cv2.circle(m, (round(c * scale), round(c * scale)), round(r * scale), 1, -1, cv2.LINE_8, shift)
    elif shape == "ring":
        cv2.circle(m, (round(c * scale), round(c * scale)), round(r * scale), 1, -1, cv2.LINE_8, shift)
        inner = r * rng.uniform(0.45, 0.65)
        cv2.circle(m, (round(c * scale), round(c * scale)), round(inner * scale), 0, -1, cv2.LINE_8, shift)
    elif shape == "ellipse":
        minor = r / rng.uniform(1.6, 2.8)
        cv2.ellipse(
            m,
            (round(c * scale), round(c * scale)),
            (round(r * scale), round(minor * scale)),
            math.degrees(angle),
            0,
            360,
            1,
            -1,
            cv2.LINE_8,
            shift,
        )
    elif shape == "square":
        h = r / math.sqrt(2)
        poly(rotated(np.array([[-h, -h], [h, -h], [h, h], [-h, h]])))
    elif shape == "rectangle":
        aspect = rng.uniform(1.7, 3.0)
        # half-diagonal = r
        hw = r / math.sqrt(1 + 1 / aspect**2)
        hh = hw / aspect
        poly(rotated(np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])))
    elif shape == "triangle":
        pts = _regular_polygon(3, r, angle)
        pts = pts + rng.uniform(-0.12, 0.12, size=pts.shape) * r
        poly(pts)
    elif shape == "star":
        outer = _regular_polygon(5, r, angle)
        inner = _regular_polygon(5, r * rng.uniform(0.42, 0.55), angle + np.pi / 5)
        pts = np.empty((10, 2))
        pts[0::2], pts[1::2] = outer, inner
        poly(pts)
    elif shape == "hexagon":
        poly(_regular_polygon(6, r, angle))
    elif shape == "crescent":  # a disc with an offset disc cut out: thin, curved, concave
        cc = (round(c * scale), round(c * scale))
        cv2.circle(m, cc, round(r * scale), 1, -1, cv2.LINE_8, shift)
        off = r * rng.uniform(0.35, 0.5)
        cut = (round((c + off * math.cos(angle)) * scale), round((c + off * math.sin(angle)) * scale))
        cv2.circle(m, cut, round(r * rng.uniform(0.8, 0.95) * scale), 0, -1, cv2.LINE_8, shift)
    elif shape == "cross":  # a plus sign, arms a third of its extent wide
        a, b = r / math.sqrt(2), r / (3 * math.sqrt(2))
        poly(rotated(np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                               [-a, b], [-a, -b], [-b, -b]])))
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {shape!r}")
    ys, xs = np.nonzero(m)
    return m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(bool)


# ----------------------------------------------------------------------------- background


def _random_bg_colour(rng: np.random.Generator) -> np.ndarray:
    # Mostly muted colours; sometimes close to a palette colour, so colour alone is no cue.
    if rng.random() < 0.25:
        base = np.array(COLOURS[rng.choice(list(COLOURS))], np.float32)
        return np.clip(base * rng.uniform(0.5, 0.9) + rng.uniform(-30, 30, 3), 0, 255)
    grey = rng.uniform(30, 225)
    return np.clip(grey + rng.uniform(-45, 45, 3), 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.choice(["plain", "gradient", "noise", "stripes", "checks"], p=[0.2, 0.2, 0.2, 0.2, 0.2])
    c1, c2 = _random_bg_colour(rng), _random_bg_colour(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "plain":
        img = np.broadcast_to(c1, (h, w, 3)).copy()
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == "noise":
        cells = int(rng.integers(4, 40))
        low = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        low = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
        img = c1 + low * rng.uniform(10, 35) + rng.normal(0, rng.uniform(3, 18), (h, w, 3)).astype(np.float32)
    elif kind == "stripes":
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 60)
        t = xx * math.cos(a) + yy * math.sin(a)
        on = (np.floor(t / period) % 2).astype(bool)
        img = np.where(on[..., None], c1, c2)
    else:  # checks
        cell = rng.uniform(6, 60)
        on = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(bool)
        img = np.where(on[..., None], c1, c2)
    img = np.ascontiguousarray(np.clip(img, 0, 255), dtype=np.float32)

    if rng.random() < 0.6:  # clutter: thin lines and small specks, not objects
        palette = list(COLOURS.values())
        for _ in range(int(rng.integers(0, 30))):
            colour = palette[rng.integers(len(palette))] if rng.random() < 0.5 else rng.uniform(0, 255, 3)
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p2 = (int(p1[0] + rng.normal(0, w / 4)), int(p1[1] + rng.normal(0, h / 4)))
            cv2.line(img, p1, p2, tuple(float(v) for v in colour), int(rng.integers(1, 3)), cv2.LINE_AA)
        for _ in range(int(rng.integers(0, 80))):
            colour = palette[rng.integers(len(palette))] if rng.random() < 0.5 else rng.uniform(0, 255, 3)
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(img, centre, int(rng.integers(1, 4)), tuple(float(v) for v in colour), -1, cv2.LINE_AA)
    return img


# ----------------------------------------------------------------------------- scene


def _pick_size(rng: np.random.Generator, size: int | tuple[int, int] | None) -> tuple[int, int]:
    if size is None:
        if rng.random() < 0.5:
            s = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            return s, s
        return int(rng.integers(MIN_SIDE, MAX_SIDE + 1)), int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _one_component(mask: np.ndarray) -> bool:
    n, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return n == 2  # background + one piece


def generate_scene(seed: int, size: int | tuple[int, int] | None = None,
                   shapes: tuple[str, ...] = SHAPES) -> Scene:
    """The scene of ``seed``; ``size`` is the side (int) or ``(height, width)``, else drawn from the seed."""
    rng = np.random.default_rng(seed)
    h, w = _pick_size(rng, size)
    if h < 32 or w < 32:
        raise ValueError(f"image size must be at least 32 px a side, got {(h, w)}")
    background = _background(rng, h, w)
    side = min(h, w)
    n_target = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))

    full: list[np.ndarray] = []  # full mask of each placed object, (h, w) bool
    visible: list[np.ndarray] = []
    boxes: list[tuple[int, int, int, int]] = []  # x0, y0, x1, y1 of the full mask
    meta: list[tuple[str, str, np.ndarray]] = []  # shape, colour name, rgb
    attempts = 0
    while len(full) < n_target and attempts < 40 * n_target:
        attempts += 1
        shape = str(rng.choice(shapes))
        lo = max(MIN_SIZE_FRACTION * side, MIN_SIZE_PIXELS * (1.6 if shape == "ring" else 1.0))
        hi = max(MAX_SIZE_FRACTION * side, lo + 1)
        if attempts > 20 * n_target:  # crowded: try smaller ones
            hi = max(lo + 1, hi / 2)
        obj_size = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        crop = _shape_mask(rng, shape, obj_size)
        ch, cw = crop.shape
        if ch >= h or cw >= w:
            continue
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        box = (x0, y0, x0 + cw, y0 + ch)
        m = np.zeros((h, w), bool)
        m[y0 : y0 + ch, x0 : x0 + cw] = crop
        if int(crop.sum()) < MIN_VISIBLE_PIXELS:
            continue

        # Occlusion: every earlier object must stay visible enough, in one piece.
        new_visible: dict[int, np.ndarray] = {}
        ok = True
        for j, (bj, vj) in enumerate(zip(boxes, visible)):
            if bj[0] >= box[2] or box[0] >= bj[2] or bj[1] >= box[3] or box[1] >= bj[3]:
                continue
            if not (vj & m).any():
                continue
            vj2 = vj & ~m
            area, full_area = int(vj2.sum()), int(full[j].sum())
            if area < MIN_VISIBLE_PIXELS or area < MIN_VISIBLE_FRACTION * full_area:
                ok = False
                break
            sl = (slice(bj[1], bj[3]), slice(bj[0], bj[2]))
            if not _one_component(vj2[sl]):
                ok = False
                break
            new_visible[j] = vj2
        if not ok:
            continue

        # Colour: differ from the background under it and from every object it touches.
        ring = cv2.dilate(
            m[max(y0 - 3, 0) : y0 + ch + 3, max(x0 - 3, 0) : x0 + cw + 3].astype(np.uint8), np.ones((7, 7), np.uint8)
        )
        near = np.zeros((h, w), bool)
        near[max(y0 - 3, 0) : y0 + ch + 3, max(x0 - 3, 0) : x0 + cw + 3] = ring.astype(bool)
        touching = {meta[j][1] for j, vj in enumerate(visible) if (vj & near).any()}
        under = background[near]
        candidates = []
        for name, rgb in COLOURS.items():
            if name in touching:
                continue
            d = np.linalg.norm(under - np.asarray(rgb, np.float32), axis=1)
            if np.percentile(d, 5) >= _MIN_BG_CONTRAST:
                candidates.append(name)
        if not candidates:
            continue
        colour = str(rng.choice(candidates))
        rgb = np.clip(np.asarray(COLOURS[colour], np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)

        for j, vj2 in new_visible.items():
            visible[j] = vj2
        full.append(m)
        visible.append(m.copy())
        boxes.append(box)
        meta.append((shape, colour, rgb))

    img = background
    for (_shape, _colour, rgb), m, box in zip(meta, full, boxes):
        x0, y0, x1, y1 = box
        # gentle shading across the object
        a = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        t = ((xx - x0) * math.cos(a) + (yy - y0) * math.sin(a)) / max(x1 - x0, y1 - y0)
        shade = rgb[None, None, :] + (t[..., None] * rng.uniform(-15, 15))
        sub = img[y0:y1, x0:x1]
        mm = m[y0:y1, x0:x1]
        sub[mm] = shade[mm]
    sigma = rng.uniform(0, 6)
    if sigma > 0.5:
        img = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    objects = tuple(SceneObject(shape=s, colour=c, mask=v) for (s, c, _), v in zip(meta, visible))
    return Scene(image=image, objects=objects)


# ----------------------------------------------------------------------------- labels
