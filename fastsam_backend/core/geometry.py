"""Mask-geometry descriptors of instances: a second, CLIP-independent cue for learned labels.

Object kinds in real projects (cell types, defects, SKUs) differ by size and outline as well as by
appearance, and a crop embedding may encode colour and texture far better than shape (the fixture
CLIP does: docs/learned-labels.md). Each instance's descriptor is computed from
its cached mask crop alone, so it costs no forward pass: a few OpenCV contour and moment calls per
instance (about 0.2 ms each; 18 ms for 100 instances of a 1024² image, docs/learned-labels.md), and only for the
instances being labelled.

The descriptor is a ``(G,)`` float32 vector (``FEATURES`` names the columns). Every entry is
invariant to translation and, but for the box aspect and extent, to rotation; all but the area are
invariant to scale. ``GEOMETRY_VERSION`` names this layout: stored examples of another version are
used without their geometry (``example_store``), never compared with these.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from fastsam_backend.core.masks import MaskSet

GEOMETRY_VERSION = 1
FEATURES: tuple[str, ...] = (
    "log_area_fraction",  # size relative to the image (log: sizes span orders of magnitude)
    "log_elongation",  # sqrt of the second-moment eigenvalue ratio: rotation-invariant aspect
    "abs_log_box_aspect",  # |log(w / h)| of the tight box
    "extent",  # area / box area
    "solidity",  # area / convex-hull area: stars and notched outlines are low
    "circularity",  # 4 pi area / perimeter^2: 1 for a disc
    "log_vertices",  # corners of the outline simplified to 2 % of its perimeter
    "hole_fraction",  # hole area / filled area: rings, donuts, hollow parts
    "log1p_holes",  # number of holes
    "hu1", "hu2", "hu3", "hu4",  # log-scaled Hu moment invariants (the higher ones are mostly noise)
    "rectangularity",  # area / minimum-area rotated rectangle: boxes ~1, discs pi/4
    "circle_fill",  # area / minimum enclosing circle: discs ~1, polygons less
    # Fourier magnitudes of the outline's centroid-distance r(arc length), over its mean: the
    # k-fold symmetries (k corners or lobes) of an outline, rotation- and start-invariant.
    *(f"radial_h{k}" for k in range(1, 9)),
)
_HARMONICS = 8
_SAMPLES = 64  # outline points the radial profile is resampled to
N_FEATURES = len(FEATURES)
MAX_SIDE = 256  # larger crops are shrunk first: the shape keeps, the contour calls stay cheap
_MIN_HOLE_FRACTION = 0.005  # holes smaller than this part of the filled area are mask noise, not holes


def mask_geometry(masks: MaskSet, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """``(len(indices), G)`` float32 descriptors of instances ``indices`` (default: all) of ``masks``.

    Only the asked-for instances are computed (a click labels one instance, not the image's 100).
    """
    idx = range(len(masks)) if indices is None else [int(i) for i in indices]
    h, w = masks.image_size
    out = np.zeros((len(idx), N_FEATURES), np.float32)
    for row, i in enumerate(idx):
        out[row] = crop_geometry(masks.crops[i], int(masks.areas[i]), h * w)
    return out


def crop_geometry(crop: np.ndarray, area: int, image_pixels: int) -> np.ndarray:
    """``(G,)`` float32 descriptor of one ``(h, w)`` bool mask crop of ``area`` pixels."""
    bh, bw = crop.shape
    feats = np.zeros(N_FEATURES, np.float32)
    if area <= 0:
        return feats
    feats[0] = np.log(area / image_pixels)
    feats[2] = abs(np.log(bw / bh))
    feats[3] = area / (bw * bh)
    img = crop.astype(np.uint8)
    if max(bh, bw) > MAX_SIDE:
        s = MAX_SIDE / max(bh, bw)
        img = cv2.resize(img, (max(1, round(bw * s)), max(1, round(bh * s))), interpolation=cv2.INTER_NEAREST)
    # A 1-pixel border so that outlines touching the crop's edge close (findContours needs it).
    img = cv2.copyMakeBorder(img, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    m = cv2.moments(img, binaryImage=True)
    if m["m00"] <= 0:
        return feats
    mu20, mu02, mu11 = m["mu20"] / m["m00"], m["mu02"] / m["m00"], m["mu11"] / m["m00"]
    root = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    lam1, lam2 = (mu20 + mu02) / 2 + root, (mu20 + mu02) / 2 - root
    feats[1] = 0.5 * np.log(max(lam1, 1e-6) / max(lam2, 1e-6))
    hu = cv2.HuMoments(m).reshape(-1)[:4]
    feats[9:13] = -np.sign(hu) * np.log10(np.maximum(np.abs(hu), 1e-30))
    contours, hierarchy = cv2.findContours(img, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return feats
    parents = hierarchy[0][:, 3]
    outer = [c for c, p in zip(contours, parents) if p < 0]
    holes = [abs(cv2.contourArea(c)) for c, p in zip(contours, parents) if p >= 0]
    filled = sum(abs(cv2.contourArea(c)) for c in outer)
    holes = [a for a in holes if a >= _MIN_HOLE_FRACTION * max(filled, 1.0)]
    main = max(outer, key=cv2.contourArea)
    pixels = float(m["m00"])
    hull = abs(cv2.contourArea(cv2.convexHull(np.concatenate(outer))))
    feats[4] = min(filled / hull, 1.0) if hull > 0 else 1.0
    perimeter = sum(cv2.arcLength(c, True) for c in outer) + sum(
        cv2.arcLength(c, True) for c, p in zip(contours, parents) if p >= 0)
    feats[5] = min(4 * np.pi * pixels / perimeter**2, 1.0) if perimeter > 0 else 0.0
    vertices = cv2.approxPolyDP(main, 0.02 * cv2.arcLength(main, True), True)
    feats[6] = np.log(max(len(vertices), 1))
    feats[7] = sum(holes) / filled if filled > 0 else 0.0
    feats[8] = np.log1p(len(holes))
    # Outline areas, not pixel counts, against the fitted rectangle and circle: both are traced
    # through pixel centres, so the ratios do not drift with the object's size.
    main_area = abs(cv2.contourArea(main))
    (_, (rw, rh), _) = cv2.minAreaRect(main)
    feats[13] = min(main_area / (rw * rh), 1.0) if rw * rh > 0 else 1.0
    _, radius = cv2.minEnclosingCircle(main)
    feats[14] = min(main_area / (np.pi * radius**2), 1.0) if radius > 0 else 1.0
    feats[15:15 + _HARMONICS] = radial_harmonics(main[:, 0, :].astype(np.float64))
    return feats


def radial_harmonics(points: np.ndarray) -> np.ndarray:
    """``(8,)`` magnitudes of harmonics 1..8 of the distance from the outline's centroid, resampled
    at equal arc length, over the mean distance. ``points``: ``(P, 2)`` closed outline, pixels."""
    out = np.zeros(_HARMONICS, np.float32)
    if len(points) < 3:
        return out
    closed = np.vstack([points, points[:1]])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    if arc[-1] <= 0:
        return out
    at = np.linspace(0.0, arc[-1], _SAMPLES, endpoint=False)
    xy = np.stack([np.interp(at, arc, closed[:, 0]), np.interp(at, arc, closed[:, 1])], axis=1)
    r = np.linalg.norm(xy - xy.mean(axis=0), axis=1)
    spectrum = np.abs(np.fft.rfft(r)) / len(r)
    out[:] = spectrum[1:_HARMONICS + 1] / max(spectrum[0], 1e-9)
    return out


def click_points(mask: np.ndarray, rng: np.random.Generator, n_random: int = 1) -> list[tuple[int, int]]:
    """Clicks on a ``(H, W)`` bool mask, as ``(x, y)`` pixels: the deepest interior pixel (the quality
    harness's and fine-tuning's click per object) plus ``n_random`` random pixels at least 3 px inside the object."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    points = [(int(x), int(y))]
    inner = np.argwhere(dist >= min(3.0, float(dist.max())))
    for _ in range(n_random):
        yy, xx = inner[rng.integers(len(inner))]
        points.append((int(xx), int(yy)))
    return points
