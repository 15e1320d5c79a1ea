"""Prompt-guided selection: pure numpy over a ``MaskSet`` (no HTTP, no cache, no torch).

All coordinates are pixels of the original image: points ``(x, y)`` = (column, row),
boxes ``x0, y0, x1, y1`` with exclusive end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fastsam_backend.core.boxmatch import best_box_match, box_ious, match_box  # noqa: F401 - the first two re-exported
from fastsam_backend.core.masks import MaskSet
from fastsam_backend.core.morphology import inner_objects, smooth_mask
from fastsam_backend.settings import BoxRule, PointRule

log = logging.getLogger(__name__)

# The smallest-mask rule also takes covering masks this similar to its pick: the same object found twice.
DUPLICATE_IOU = 0.5


@dataclass(frozen=True)
class Selection:
    """One selected region: ``crop`` is its part inside ``box`` (``(y1 - y0, x1 - x0)`` bool), and
    nothing of it lies outside the box; ``mask`` is the whole ``(H, W)`` bool at original
    resolution, built on first use (an answer encodes its regions from the crops: an exemplar's 20
    regions would otherwise build 20 image-sized masks).

    ``Selection.of_mask`` makes one from a dense mask, ``Selection.of_instance`` one instance's.
    """

    crop: np.ndarray
    score: float
    indices: tuple[int, ...]  # which instances of the MaskSet went into it
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive): the union of their boxes, holds the mask
    image_size: tuple[int, int]  # (height, width) of the image

    @classmethod
    def of_mask(cls, mask: np.ndarray, score: float, indices: tuple[int, ...],
                box: tuple[int, int, int, int]) -> Selection:
        """From an ``(H, W)`` mask that ``box`` (within the image) holds; the mask is kept as ``mask``."""
        x0, y0, x1, y1 = box
        selection = cls(mask[y0:y1, x0:x1], score, indices, box, (int(mask.shape[0]), int(mask.shape[1])))
        selection.__dict__["mask"] = mask  # already built: ``mask`` (a cached property) returns it
        return selection

    @classmethod
    def of_instance(cls, masks: MaskSet, i: int, score: float) -> Selection:
        """Instance ``i`` of ``masks`` alone: its crop (shared with the mask set, never written) and box."""
        x0, y0, x1, y1 = masks.boxes[i].tolist()
        return cls(masks.crops[i], score, (int(i),), (x0, y0, x1, y1), masks.image_size)

    @cached_property
    def mask(self) -> np.ndarray:
        out = np.zeros(self.image_size, dtype=bool)
        x0, y0, x1, y1 = self.box
        out[y0:y1, x0:x1] = self.crop
        return out


def _as_points(points: np.ndarray) -> np.ndarray:
    return np.asarray(points, dtype=np.int64).reshape(-1, 2)


def _membership(masks: MaskSet, points: np.ndarray) -> np.ndarray:
    """``(K, N)`` bool: point k lies in mask n."""
    return np.array([masks.contains(int(x), int(y)) for x, y in points], dtype=bool).reshape(
        len(points), len(masks)
    )


def _smallest(candidates: np.ndarray, areas: np.ndarray) -> int | None:
    idx = np.flatnonzero(candidates)
    return int(idx[np.argmin(areas[idx])]) if idx.size else None


def _indices_smallest(masks: MaskSet, inside: np.ndarray, positive: np.ndarray) -> list[int]:
    """Per foreground click, the smallest mask covering it that covers no background click,
    plus the other covering masks that duplicate it (IoU >= ``DUPLICATE_IOU``).

    Avoids the paper rule's failure: a click on an object also lies inside the
    background/scene masks around it, and their union swallows the object. Those
    masks are much larger than the object (low IoU with it); a second detection of
    the same object that NMS kept (a part, or the object with its shadow) is not,
    and adding it recovers what the smaller one missed.
    """
    areas = masks.areas
    covers_negative = inside[~positive].any(axis=0)
    chosen: list[int] = []
    for k in np.flatnonzero(positive):
        allowed = inside[k] & ~covers_negative
        best = _smallest(allowed, areas)
        if best is None:  # every covering mask also covers a negative click: take the smallest anyway
            allowed = inside[k]
            best = _smallest(allowed, areas)
        if best is None:
            continue
        # IoU(best, n) <= area(best) / area(n): only masks up to 1 / DUPLICATE_IOU times larger can qualify
        near = allowed & (areas * DUPLICATE_IOU <= areas[best])
        picked = [best] + [int(n) for n in np.flatnonzero(near)
                           if n != best and masks.iou(best, int(n)) >= DUPLICATE_IOU]
        chosen += [n for n in picked if n not in chosen]
    return chosen


def _paint_casia(masks: MaskSet, inside: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """CASIA ``point_prompt``: largest masks first; each later (smaller) mask repaints its pixels."""
    out = np.zeros(masks.image_size, dtype=bool)
    used: list[int] = []
    for n in np.argsort(-masks.areas, kind="stable"):
        hits = inside[:, n]
        if not hits.any():
            continue
        x0, y0, x1, y1 = masks.boxes[n]
        crop = masks.crops[n]
        for k in np.flatnonzero(hits):  # in click order, as the reference does
            out[y0:y1, x0:x1][crop] = bool(positive[k])
        used.append(int(n))
    return out, used


def select_by_points(
    masks: MaskSet,
    points: np.ndarray,
    positive: np.ndarray,
    *,
    rule: PointRule = PointRule.SMALLEST,
    morphology: bool = True,
) -> Selection | None:
    """Merge the masks picked by clicks into one region.

    Args:
        masks: all instances of the image.
        points: ``(K, 2)`` int, ``x, y`` pixels.
        positive: ``(K,)`` bool, False for background (Alt) clicks.
        rule: ``SMALLEST`` (default), ``PAPER`` or ``CASIA`` — see ``PointRule``.
        morphology: remove specks / fill small holes sized to the result.

    Returns:
        The merged region, or None when no foreground click lies on any mask.
    """
    points = _as_points(points)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    if len(points) != len(positive):
        raise ValueError(f"{len(points)} points but {len(positive)} labels")
    if len(masks) == 0 or not positive.any():
        return None
    inside = _membership(masks, points)

    if rule is PointRule.CASIA:
        merged, used = _paint_casia(masks, inside, positive)
    else:
        if rule is PointRule.PAPER:
            used = list(np.flatnonzero(inside[positive].any(axis=0) & ~inside[~positive].any(axis=0)))
        else:
            used = _indices_smallest(masks, inside, positive)
        merged = masks[used].union() if used else np.zeros(masks.image_size, dtype=bool)
        # A background click still inside the result cuts out the smallest mask under it
        # that holds no foreground click (the object it was meant to exclude).
        holds_positive = inside[positive].any(axis=0)
        for k in np.flatnonzero(~positive):
            x, y = points[k]
            if merged[y, x] and (cut := _smallest(inside[k] & ~holds_positive, masks.areas)) is not None:
                merged &= ~masks.mask(cut)
    if not used:
        return None
    box = masks.union_box(used)
    if not _any_inside(merged, box):
        return None
    if morphology:
        merged = smooth_mask(merged, keep_points=points[positive], box=box, open_points=points[~positive],
                             objects=inner_objects(masks, used, box))
    score = float(masks.scores[used].mean())
    return Selection.of_mask(merged, score, tuple(int(i) for i in used), box)


def _any_inside(mask: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    """Whether ``mask`` has a pixel in ``box``; for a box known to hold the whole mask, whether
    it has any, looking at the box only."""
    x0, y0, x1, y1 = box
    return bool(mask[y0:y1, x0:x1].any())


def select_by_box(
    masks: MaskSet,
    box: tuple[int, int, int, int],
    points: np.ndarray | None = None,
    positive: np.ndarray | None = None,
    *,
    rule: PointRule = PointRule.SMALLEST,
    morphology: bool = True,
    box_rule: BoxRule = BoxRule.FIT,
) -> Selection | None:
    """The mask ``box_rule`` picks for the box (``boxmatch.match_box``; the paper's: the highest
    pixel IoU with the box); clicks inside it refine the result.

    With clicks, foreground clicks add their masks and background clicks cut theirs
    (as ``select_by_points``), and the result is clipped to the box.
    """
    if len(masks) == 0:
        return None
    best, best_iou = match_box(masks, box, box_rule)
    if best_iou <= 0:
        return None
    x0, y0, x1, y1 = box
    pts = pos = None
    if points is not None and len(points):
        pts = _as_points(points)
        pos = np.asarray(positive, dtype=bool).reshape(-1)
        in_box = (pts[:, 0] >= x0) & (pts[:, 0] < x1) & (pts[:, 1] >= y0) & (pts[:, 1] < y1)
        pts, pos = pts[in_box], pos[in_box]
    if pts is None or not len(pts):  # the box alone: its instance as it is (no (H, W) mask built)
        return Selection.of_instance(masks, best, float(masks.scores[best]))
    mask = masks.mask(best)
    used = [best]
    # clicks inside the box refine the mask; smoothing respects them
    inside = _membership(masks, pts)
    for k in np.flatnonzero(pos):
        if not mask[pts[k, 1], pts[k, 0]] and (add := _smallest(inside[k], masks.areas)) is not None:
            mask |= masks.mask(add)
            used.append(add)
    holds_pos = inside[pos].any(axis=0)
    for k in np.flatnonzero(~pos):
        if mask[pts[k, 1], pts[k, 0]] and (cut := _smallest(inside[k] & ~holds_pos, masks.areas)) is not None:
            mask &= ~masks.mask(cut)
    clip = np.zeros_like(mask)
    clip[y0:y1, x0:x1] = True
    mask &= clip
    refine_points, refine_open = pts[pos], pts[~pos]
    union = masks.union_box(used)
    if morphology and _any_inside(mask, union):
        mask = smooth_mask(mask, keep_points=refine_points, box=union, open_points=refine_open,
                           objects=inner_objects(masks, used, union))
    if not _any_inside(mask, union):
        return None
    return Selection.of_mask(mask, float(masks.scores[best]), tuple(used), union)


SEVERAL_PREFIXES = ("all ", "every ", "each ", "both ")


def names_several(text: str) -> bool:
    """'all red circles', 'every car': the text asks for several objects."""
    return text.strip().lower().startswith(SEVERAL_PREFIXES)


def select_by_text(
    similarities: np.ndarray,
    candidates: np.ndarray | None = None,
    *,
    several: bool = False,
    margin: float = 0.02,
) -> list[int]:
    """Indices of the masks a text picks: the most similar one, or with ``several`` every
    mask within ``margin`` (cosine) of it.

    Args:
        similarities: ``(N,)`` cosine similarity of each mask's crop with the text; masks
            that were not scored (too small) should be ``-inf``.
        candidates: ``(N,)`` bool, masks allowed by other prompts (a box, clicks), or None.
    """
    sims = np.asarray(similarities, dtype=np.float64).copy()
    if candidates is not None:
        sims[~np.asarray(candidates, dtype=bool)] = -np.inf
    if sims.size == 0 or not np.isfinite(sims.max()):
        return []
    best = int(np.argmax(sims))
    if not several:
        return [best]
    chosen = np.flatnonzero(sims >= sims[best] - margin)
    return [int(i) for i in chosen[np.argsort(-sims[chosen], kind="stable")]]


def text_candidates(masks: MaskSet, boxes: list[tuple[int, int, int, int]], points: np.ndarray,
                    positive: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the masks a text prompt may pick, given the other prompts drawn with it.

    A box keeps the masks lying mostly (≥ half their area) inside it; a foreground click keeps
    the masks under it, a background click the masks not under it.
    """
    candidates = np.ones(len(masks), dtype=bool)
    for box in boxes:
        candidates &= masks.box_intersections(box) >= 0.5 * masks.areas
    for (x, y), pos in zip(_as_points(points), np.asarray(positive, dtype=bool).reshape(-1)):
        covers = masks.contains(int(x), int(y))
        candidates &= covers if pos else ~covers
    return candidates


def select_by_text_prompt(masks: MaskSet, similarities: np.ndarray, candidates: np.ndarray | None = None, *,
                          several: bool = False, margin: float = 0.02) -> Selection | None:
    """``select_by_text``'s pick as one merged region, or None when nothing may be picked."""
    picked = select_by_text(similarities, candidates, several=several, margin=margin)
    if not picked:
        return None
    return Selection.of_mask(masks[picked].union(), float(np.mean(masks.scores[picked])), tuple(picked),
                             masks.union_box(picked))


def preannotation_order(masks: MaskSet, *, min_area: float, min_score: float, max_instances: int) -> list[int]:
    """Indices of the instances pre-annotation keeps, highest score first.

    Args:
        min_area: fraction of the image below which an instance is dropped.
        min_score: confidence below which an instance is dropped.
        max_instances: at most this many (the best ones).
    """
    h, w = masks.image_size
    keep = (masks.areas >= min_area * h * w) & (masks.scores >= min_score)
    order = [int(i) for i in np.argsort(-masks.scores, kind="stable") if keep[i]]
    return order[:max_instances]
