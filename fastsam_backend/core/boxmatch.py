"""Which mask a box prompt picks: the paper's pixel-IoU rule and two rules that also use each
mask's own bounding box (issue #15). Pure numpy over a ``MaskSet``.

Boxes are ``x0, y0, x1, y1`` pixels of the original image, exclusive end.

The paper's rule scores a mask by ``|box ∩ mask| / |box ∪ mask|`` over pixels. An object that
covers a small part of its own box (a ring, a diagonal bar, the visible rest of a half-hidden
shape) then loses to a filled neighbour lying in the box. The box rules compare the prompt box
with the mask's *box* instead, which such an object fills exactly:

* ``box``: ``IoU(prompt box, mask box)``;
* ``fit``: that IoU times the share of the mask's pixels inside the prompt box, so a mask that
  spills out of the box (the occluder, a merged pair) loses even when its box is similar.

Both break ties (several masks with the same box: an object found twice, with and without a
hole) by the pixel IoU, and never pick a mask with no pixel in the box.
"""

from __future__ import annotations

import numpy as np

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.settings import BoxRule

Box = tuple[int, int, int, int]


def box_ious(masks: MaskSet, box: Box) -> np.ndarray:
    """``(N,)`` float: pixel IoU of each mask with the box."""
    x0, y0, x1, y1 = box
    box_area = max(x1 - x0, 0) * max(y1 - y0, 0)
    inter = masks.box_intersections(box)
    union = box_area + masks.areas - inter
    return np.divide(inter, union, out=np.zeros(len(masks)), where=union > 0)


def box_box_ious(masks: MaskSet, box: Box) -> np.ndarray:
    """``(N,)`` float: IoU of each mask's tight box with ``box`` (box areas, no pixels counted)."""
    x0, y0, x1, y1 = box
    box_area = max(x1 - x0, 0) * max(y1 - y0, 0)
    b = masks.boxes.astype(np.int64)
    own = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter = masks.box_overlaps(box)
    union = box_area + own - inter
    return np.divide(inter, union, out=np.zeros(len(masks)), where=union > 0)


def best_box_match(masks: MaskSet, box: Box) -> tuple[int, float]:
    """``(index, IoU)`` of the mask with the highest pixel IoU with ``box`` (the paper's rule);
    ``argmax(box_ious(...))``.

    Counts pixels only while a mask could still win: a mask's pixels inside the box are at
    most ``min(area, box overlap)``, which bounds its IoU, and masks are visited by that bound.
    """
    x0, y0, x1, y1 = box
    box_area = max(x1 - x0, 0) * max(y1 - y0, 0)
    areas = masks.areas
    most = np.minimum(areas, masks.box_overlaps(box))
    union = box_area + areas - most
    bound = np.divide(most, union, out=np.zeros(len(masks)), where=union > 0)
    best, best_iou = 0, 0.0
    for i in np.argsort(-bound, kind="stable"):
        if bound[i] < best_iou or bound[i] <= 0:
            break
        inter = masks.box_intersection(int(i), box)
        union_i = box_area + int(areas[i]) - inter
        iou = inter / union_i if union_i else 0.0
        if iou > best_iou or (iou == best_iou and iou > 0 and i < best):
            best, best_iou = int(i), iou
    return best, best_iou


def _best_by_box(masks: MaskSet, box: Box, *, spill: bool) -> tuple[int, float]:
    """The ``box`` / ``fit`` rules. Both scores are at most the box IoU, so masks are visited by
    it and pixels are counted only while a mask can still win or tie."""
    x0, y0, x1, y1 = box
    box_area = max(x1 - x0, 0) * max(y1 - y0, 0)
    areas = masks.areas
    bound = box_box_ious(masks, box)
    best, best_score, best_pixel = 0, 0.0, -1.0
    for i in np.argsort(-bound, kind="stable"):
        if bound[i] <= 0 or bound[i] < best_score:
            break
        inter = masks.box_intersection(int(i), box)
        if inter == 0:
            continue
        score = float(bound[i]) * (inter / int(areas[i]) if spill else 1.0)
        pixel = inter / (box_area + int(areas[i]) - inter)
        if score > best_score or (score == best_score and pixel > best_pixel):
            best, best_score, best_pixel = int(i), score, pixel
    return best, best_score


def match_box(masks: MaskSet, box: Box, rule: BoxRule = BoxRule.FIT) -> tuple[int, float]:
    """``(index, score)`` of the mask ``rule`` picks for ``box``; a score of 0 means no mask has a
    pixel in the box (the index is then meaningless)."""
    if len(masks) == 0:
        return 0, 0.0
    if rule is BoxRule.PAPER:
        return best_box_match(masks, box)
    return _best_by_box(masks, box, spill=rule is BoxRule.FIT)
