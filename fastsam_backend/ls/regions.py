"""Selected masks → Label Studio result regions (brush RLE, polygons, rectangles).

Regions carry ``original_width``/``original_height`` of the decoded image and percent
coordinates, as LS stores them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from fastsam_backend.ls.labelconfig import OutputTag
from fastsam_backend.ls.polygons import DEFAULT_STYLE, PolygonStyle, mask_outlines
from fastsam_backend.ls.rle import encode_rle, encode_rle_crops


def _region(tag: OutputTag, kind: str, image_size: tuple[int, int], value: dict, score: float) -> dict[str, Any]:
    height, width = image_size
    return {
        # 10 random hex digits, as uuid4().hex[:10] gave (a UUID4's first 5 bytes are random) at a
        # fifth of its cost: an exemplar answer has 20 regions
        "id": os.urandom(5).hex(),
        "from_name": tag.from_name,
        "to_name": tag.to_name,
        "type": kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
        "score": round(float(score), 4),
        "readonly": False,
    }


def _labels(label: str | None) -> list[str]:
    return [label] if label else []


Box = tuple[int, int, int, int]


def _within(mask: np.ndarray, box: Box | None, pad: int = 0) -> tuple[np.ndarray, int, int]:
    """``(view, x0, y0)``: the part of ``mask`` inside ``box`` grown by ``pad`` (clipped to the
    image), or the whole mask. ``box`` must hold every nonzero pixel of ``mask``."""
    if box is None:
        return mask, 0, 0
    h, w = mask.shape
    x0, y0 = max(int(box[0]) - pad, 0), max(int(box[1]) - pad, 0)
    x1, y1 = min(int(box[2]) + pad, w), min(int(box[3]) + pad, h)
    return mask[y0:max(y1, y0), x0:max(x1, x0)], x0, y0


def brush_region(tag: OutputTag, mask: np.ndarray, label: str | None, score: float,
                 box: Box | None = None) -> dict[str, Any]:
    """One BrushLabels region; ``mask`` is ``(H, W)`` bool at original resolution. ``box``
    (``x0, y0, x1, y1``), when the caller knows one that holds the whole mask, limits every
    function here to it: the cost follows the object's size, not the image's."""
    value = {"format": "rle", "rle": encode_rle(mask, box), "brushlabels": _labels(label)}
    return _region(tag, "brushlabels", mask.shape, value, score)


def brush_regions(tag: OutputTag, image_size: tuple[int, int], boxes: Sequence[Box], crops: Sequence[np.ndarray],
                  label: str | None, scores: Sequence[float]) -> list[dict[str, Any]]:
    """``brush_region`` of several masks of one image, each given as its box (within the image)
    and its crop there (zero outside the box), encoded together (``rle.encode_rle_crops``)."""
    return [_region(tag, "brushlabels", image_size, {"format": "rle", "rle": list(rle),
                                                     "brushlabels": _labels(label)}, score)
            for rle, score in zip(encode_rle_crops(image_size, boxes, crops), scores)]


def rectangle_region(tag: OutputTag, mask: np.ndarray, label: str | None, score: float,
                     box: Box | None = None) -> dict[str, Any] | None:
    """The mask's tight bounding box as a RectangleLabels region (percent)."""
    part, dx, dy = _within(mask, box)
    rows, cols = np.flatnonzero(part.any(axis=1)) + dy, np.flatnonzero(part.any(axis=0)) + dx
    if rows.size == 0:
        return None
    h, w = mask.shape
    value = {
        "x": 100.0 * cols[0] / w,
        "y": 100.0 * rows[0] / h,
        "width": 100.0 * (cols[-1] + 1 - cols[0]) / w,
        "height": 100.0 * (rows[-1] + 1 - rows[0]) / h,
        "rotation": 0,
        "rectanglelabels": _labels(label),
    }
    return _region(tag, "rectanglelabels", mask.shape, value, score)


def mask_polygons(mask: np.ndarray, style: PolygonStyle = DEFAULT_STYLE) -> list[np.ndarray]:
    """One outline per connected piece of ``mask``, holes joined in as keyholes
    (``polygons.mask_outlines``): ``(K, 2)`` float arrays of ``x, y`` pixels."""
    return mask_outlines(mask, style)


def polygon_regions(tag: OutputTag, mask: np.ndarray, label: str | None, score: float,
                    box: Box | None = None, style: PolygonStyle = DEFAULT_STYLE) -> list[dict[str, Any]]:
    """One PolygonLabels region per connected piece (percent coordinates), holes kept as keyholes."""
    part, dx, dy = _within(mask, box, pad=1)  # a zero border: contours as on the whole image
    return _polygons(tag, mask.shape, part, dx, dy, label, score, style)


def crop_polygon_regions(tag: OutputTag, image_size: tuple[int, int], box: Box, crop: np.ndarray,
                         label: str | None, score: float, style: PolygonStyle = DEFAULT_STYLE) -> list[dict[str, Any]]:
    """``polygon_regions`` of the mask that is ``crop`` inside ``box`` (within the image) and zero
    elsewhere, without building it: the crop gets the zero border ``_within`` would give."""
    h, w = image_size
    x0, y0, x1, y1 = (int(v) for v in box)
    pads = ((min(y0, 1), min(h - y1, 1)), (min(x0, 1), min(w - x1, 1)))
    part = np.pad(crop, pads) if any(p for side in pads for p in side) else crop
    return _polygons(tag, image_size, part, x0 - pads[1][0], y0 - pads[0][0], label, score, style)


def _polygons(tag: OutputTag, image_size: tuple[int, int], part: np.ndarray, dx: int, dy: int,
              label: str | None, score: float, style: PolygonStyle) -> list[dict[str, Any]]:
    """The regions of ``part``, the piece of an ``image_size`` mask whose top left is ``(dx, dy)``."""
    h, w = image_size
    regions = []
    for poly in mask_outlines(part, style):
        poly = poly + np.array([dx, dy], dtype=np.float64)
        points = np.column_stack([100.0 * poly[:, 0] / w, 100.0 * poly[:, 1] / h]).round(4).tolist()
        value = {"points": points, "closed": True, "polygonlabels": _labels(label)}
        regions.append(_region(tag, "polygonlabels", image_size, value, score))
    return regions


def regions_for(tag: OutputTag, mask: np.ndarray, label: str | None, score: float,
                box: Box | None = None, style: PolygonStyle = DEFAULT_STYLE) -> list[dict[str, Any]]:
    """Regions of ``tag``'s kind for one mask (``box``: see ``brush_region``; ``style``: how
    polygons are simplified)."""
    if tag.kind == "brushlabels":
        return [brush_region(tag, mask, label, score, box)]
    if tag.kind == "polygonlabels":
        return polygon_regions(tag, mask, label, score, box, style)
    rect = rectangle_region(tag, mask, label, score, box)
    return [rect] if rect else []
