"""Masks ↔ polygon outlines, holes kept as keyholes (no LS, no HTTP).

A Label Studio polygon is one closed ring of points and has no holes. A hollow object (a ring,
a frame) is still drawn faithfully: each hole is joined to the outer border by a zero-width cut
(the *keyhole*: out along the cut, round the hole the other way, back along the cut), so the
polygon, filled with either the non-zero or the even-odd rule, leaves the hole empty. This is
what ultralytics' COCO converter does for multi-part segments, and what YOLO labels of rings
need (``quality.scenes.yolo_polygons``).

Points are ``x, y`` in pixels of the original image, continuous coordinates (pixel ``(c, r)``
spans ``[c, c + 1) x [r, r + 1)``): an outline passes through the centres of the mask's border
pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PolygonStyle:
    """How masks become polygons.

    Attributes:
        tolerance_px: Douglas-Peucker tolerance in pixels (``POLYGON_TOLERANCE_PX``); 0 keeps
            every contour point.
        max_points: vertex cap per polygon (``POLYGON_MAX_POINTS``); while an outline has more,
            the tolerance grows by half.
        min_area: pieces and holes smaller than this many pixels are left out (a lone piece
            never is).
    """

    tolerance_px: float = 1.0
    max_points: int = 400
    min_area: float = 4.0

    def tag(self) -> str:
        """Short text for ``model_version`` (``k``: holes kept as keyholes)."""
        return f"pk{self.tolerance_px:g}x{self.max_points}"


DEFAULT_STYLE = PolygonStyle()


def _simplify(contour: np.ndarray, tolerance: float) -> np.ndarray:
    """``(K, 2)`` float64; at least 3 points when the contour has them."""
    points = contour.reshape(-1, 2)
    if tolerance > 0 and len(points) > 3:
        approx = cv2.approxPolyDP(contour, tolerance, True).reshape(-1, 2)
        if len(approx) >= 3:
            points = approx
    return points.astype(np.float64)


def _splice(outline: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """``outline`` with ``hole`` joined in through a zero-width cut between their closest points."""
    d = ((outline[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return np.concatenate([outline[: i + 1], hole[j:], hole[: j + 1], outline[i:]], axis=0)


def _outlines(contours, hierarchy, style: PolygonStyle, tolerance: float) -> list[np.ndarray]:
    pieces = [k for k, h in enumerate(hierarchy) if h[3] == -1]
    out = []
    for k in pieces:
        if len(pieces) > 1 and cv2.contourArea(contours[k]) < style.min_area:
            continue
        outline = _simplify(contours[k], tolerance)
        if len(outline) < 3:
            continue
        child = hierarchy[k][2]
        while child != -1:
            hole = contours[child]
            if cv2.contourArea(hole) >= style.min_area:
                simple = _simplify(hole, tolerance)
                if len(simple) >= 3:
                    outline = _splice(outline, simple)
            child = hierarchy[child][0]
        out.append(outline)
    return out


def mask_outlines(mask: np.ndarray, style: PolygonStyle = DEFAULT_STYLE) -> list[np.ndarray]:
    """One keyhole outline per connected piece of ``mask`` (``(H, W)`` bool), as ``(K, 2)``
    float64 ``x, y`` pixel arrays (continuous coordinates), each at most ``style.max_points``
    long where a tolerance can get it there. A piece inside another piece's hole is a piece."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return []
    hierarchy = hierarchy[0]
    tolerance = style.tolerance_px
    while True:
        outlines = _outlines(contours, hierarchy, style, tolerance)
        longest = max((len(o) for o in outlines), default=0)
        if longest <= style.max_points or tolerance > max(m.shape):
            break
        tolerance = max(tolerance * 1.5, 0.5)
    return [o + 0.5 for o in outlines]


def outlines_mask(outlines: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` bool: the outlines filled (what Label Studio draws), the inverse of
    ``mask_outlines`` up to the simplification."""
    out = np.zeros(shape, np.uint8)
    for outline in outlines:
        pts = np.round((np.asarray(outline, np.float64) - 0.5) * 16).astype(np.int32)
        cv2.fillPoly(out, [pts], 1, cv2.LINE_8, 4)
    return out.astype(bool)
