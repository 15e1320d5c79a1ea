"""Morphology for selections: specks removed and small holes filled, sized to the mask, inside its box.

Pure numpy/OpenCV over one ``(H, W)`` bool mask; a hole that is an object of its own (another
instance) or holds a background click stays open.
"""

from __future__ import annotations

import cv2
import numpy as np

from fastsam_backend.core.masks import MaskSet

# Morphology is sized to the mask: specks and holes below this fraction of the
# mask's area go (never below the pixel floor, so tiny masks are not eaten).
SPECK_FRACTION = 0.01
HOLE_FRACTION = 0.01
MIN_MORPH_PIXELS = 16


def _as_points(points: np.ndarray) -> np.ndarray:
    return np.asarray(points, dtype=np.int64).reshape(-1, 2)


def smooth_mask(mask: np.ndarray, keep_points: np.ndarray | None = None,
                box: tuple[int, int, int, int] | None = None, *, open_points: np.ndarray | None = None,
                objects: MaskSet | None = None) -> np.ndarray:
    """Remove specks and fill small holes, both sized to the mask's area.

    A component containing one of ``keep_points`` (``(K, 2)`` x, y) is never removed; a hole
    containing one of ``open_points`` (background clicks) is never filled, nor a hole that is
    mostly (≥ half) one of ``objects`` (other instances: an object inside the selection, not noise).
    Works on the mask's bounding box only, so cost follows object size, not image size;
    ``box`` (``x0, y0, x1, y1``, exclusive end), when the caller knows one that holds the
    whole mask, saves scanning the image for it.
    """
    if box is None:
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return mask
        cols = np.flatnonzero(mask.any(axis=0))
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    y0, y1 = max(box[1] - 1, 0), min(box[3] + 1, mask.shape[0])
    x0, x1 = max(box[0] - 1, 0), min(box[2] + 1, mask.shape[1])
    crop = mask[y0:y1, x0:x1]
    area = int(np.count_nonzero(crop))
    if area == 0:
        return mask
    speck = max(MIN_MORPH_PIXELS, int(SPECK_FRACTION * area))
    hole = max(MIN_MORPH_PIXELS, int(HOLE_FRACTION * area))
    changed = False

    # Plain labelling + a histogram: OpenCV's *WithStats variant costs 5x more (boxes, centroids).
    n, labels = cv2.connectedComponents(crop.view(np.uint8), connectivity=8)
    cleaned = crop
    if n > 2:  # several pieces: drop the specks (one piece is the whole area, never a speck)
        labelled = _Labels(labels, n)
        areas = labelled.areas()
        keep = areas >= speck
        keep[0] = False
        keep[1 + int(np.argmax(areas[1:]))] = True  # the largest piece is the object, never a speck
        if keep_points is not None:
            for x, y in _as_points(keep_points):
                if y0 <= y < y1 and x0 <= x < x1 and (label := labels[y - y0, x - x0]) != 0:
                    keep[label] = True
        if not keep[1:].all():
            cleaned, changed = labelled.paint(keep), True

    # Holes: background components that do not touch the crop border (the crop has
    # a 1 px margin wherever the image allows, so outside background touches it).
    nb, blabels = cv2.connectedComponents(1 - cleaned.view(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([blabels[0], blabels[-1], blabels[:, 0], blabels[:, -1]]))
    if nb - 1 > np.count_nonzero(border):  # some background component is enclosed (label 0 is the mask)
        labelled = _Labels(blabels, nb)
        areas = labelled.areas()
        fill = areas < hole
        fill[0] = False
        fill[border] = False
        if fill.any() and open_points is not None:
            for x, y in _as_points(open_points):
                if y0 <= y < y1 and x0 <= x < x1:
                    fill[blabels[y - y0, x - x0]] = False
        if fill.any() and objects is not None and len(objects):
            fill &= _object_overlap(objects, blabels, nb, (x0, y0)) * 2 < areas
        if fill.any():
            cleaned, changed = cleaned | labelled.paint(fill), True

    if not changed:
        return mask
    out = mask.copy()
    out[y0:y1, x0:x1] = cleaned
    return out


def _object_overlap(objects: MaskSet, labels: np.ndarray, n: int, origin: tuple[int, int]) -> np.ndarray:
    """``(n,)`` int: per label of ``labels`` (a crop at ``origin``), its largest overlap with one object."""
    ox, oy = origin
    h, w = labels.shape
    best = np.zeros(n, dtype=np.int64)
    for (x0, y0, x1, y1), crop in zip(objects.boxes.tolist(), objects.crops):
        cx0, cy0, cx1, cy1 = max(x0, ox), max(y0, oy), min(x1, ox + w), min(y1, oy + h)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        part = crop[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        hits = np.bincount(labels[cy0 - oy:cy1 - oy, cx0 - ox:cx1 - ox][part], minlength=n)
        np.maximum(best, hits, out=best)
    return best


def inner_objects(masks: MaskSet, used: list[int], box: tuple[int, int, int, int]) -> MaskSet:
    """The instances not in the selection whose box lies inside ``box``: candidates for holes that
    are objects of their own."""
    x0, y0, x1, y1 = box
    b = masks.boxes
    inside = (b[:, 0] >= x0) & (b[:, 1] >= y0) & (b[:, 2] <= x1) & (b[:, 3] <= y1)
    inside[list(used)] = False
    return masks[np.flatnonzero(inside)]


class _Labels:
    """A label image with per-label pixel counts and per-label painting. With at most 256
    labels (nearly always) OpenCV's 8-bit histogram and table lookup do it, 2-4x faster
    than numpy's bincount and gather over int32 labels."""

    def __init__(self, labels: np.ndarray, n: int) -> None:
        self.labels, self.n = labels, n
        # float32 histogram counts are exact below 2**24 pixels
        self.small = labels.astype(np.uint8) if n <= 256 and labels.size < 1 << 24 else None

    def areas(self) -> np.ndarray:
        if self.small is None:
            return np.bincount(self.labels.reshape(-1), minlength=self.n)
        return cv2.calcHist([self.small], [0], None, [256], [0, 256]).reshape(-1)[: self.n].astype(np.int64)

    def paint(self, table: np.ndarray) -> np.ndarray:
        """``(H, W)`` bool: ``table[label]`` of every pixel."""
        if self.small is None:
            return table[self.labels]
        lut = np.zeros(256, np.uint8)
        lut[: self.n] = table
        return cv2.LUT(self.small, lut).view(bool)
