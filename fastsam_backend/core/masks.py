"""``MaskSet``: the all-instance masks of one image, the one type passed between stages.

Masks are stored cropped to their tight bounding boxes. A 1024² image with 100
instances would take 100 MB as dense booleans; cropped it is usually a few MB,
and the questions the click path asks ("which masks contain this pixel?", "how
much of each mask lies in this box?") are answered from the boxes and crops
without ever building the dense stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True, eq=False)
class MaskSet:
    """Instance masks of one image.

    Attributes:
        image_size: ``(height, width)`` of the original image, pixels.
        boxes: ``(N, 4)`` int32, tight box of each mask, ``x0, y0, x1, y1`` in pixels
            with ``x1, y1`` exclusive (so the crop is ``mask[y0:y1, x0:x1]``).
        scores: ``(N,)`` float32 detection confidence in ``[0, 1]``.
        crops: ``N`` bool arrays, crop ``i`` has shape ``(y1 - y0, x1 - x0)``.
    """

    image_size: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    crops: tuple[np.ndarray, ...] = field(repr=False)

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h <= 0 or w <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        n = len(self.crops)
        if self.boxes.shape != (n, 4):
            raise ValueError(f"boxes must have shape ({n}, 4), got {self.boxes.shape}")
        if self.scores.shape != (n,):
            raise ValueError(f"scores must have shape ({n},), got {self.scores.shape}")
        for i, (crop, (x0, y0, x1, y1)) in enumerate(zip(self.crops, self.boxes.tolist())):
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise ValueError(f"box {i} {(x0, y0, x1, y1)} is empty or outside a {w}x{h} image")
            if crop.dtype != np.bool_ or crop.shape != (y1 - y0, x1 - x0):
                raise ValueError(
                    f"crop {i} must be bool of shape {(y1 - y0, x1 - x0)}, got {crop.dtype} {crop.shape}"
                )

    # ------------------------------------------------------------------ build
    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> MaskSet:
        return cls(image_size, np.zeros((0, 4), np.int32), np.zeros((0,), np.float32), ())

    @classmethod
    def from_dense(cls, masks: np.ndarray, scores: np.ndarray) -> MaskSet:
        """Build from ``(N, H, W)`` bool masks and ``(N,)`` scores; empty masks are dropped."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 3:
            raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if scores.shape[0] != masks.shape[0]:
            raise ValueError(f"{masks.shape[0]} masks but {scores.shape[0]} scores")
        boxes, crops, keep = [], [], []
        for i, mask in enumerate(masks):
            rows = np.flatnonzero(mask.any(axis=1))
            if rows.size == 0:
                continue
            cols = np.flatnonzero(mask.any(axis=0))
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            boxes.append((x0, y0, x1, y1))
            crops.append(np.ascontiguousarray(mask[y0:y1, x0:x1]))
            keep.append(i)
        return cls(
            (int(masks.shape[1]), int(masks.shape[2])),
            np.asarray(boxes, np.int32).reshape(-1, 4),
            scores[keep],
            tuple(crops),
        )

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: np.ndarray | slice | list[int] | int) -> MaskSet:
        """Select instances: a bool mask, integer indices, a slice or one index."""
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        return MaskSet(
            self.image_size, self.boxes[idx], self.scores[idx], tuple(self.crops[i] for i in idx)
        )

    @cached_property
    def areas(self) -> np.ndarray:
        """``(N,)`` int64 pixel count of each mask."""
        return np.array([np.count_nonzero(c) for c in self.crops], dtype=np.int64)

    def mask(self, i: int) -> np.ndarray:
        """Mask ``i`` as an ``(H, W)`` bool array at original resolution."""
        out = np.zeros(self.image_size, dtype=bool)
        x0, y0, x1, y1 = self.boxes[i]
        out[y0:y1, x0:x1] = self.crops[i]
        return out

    def union_box(self, indices: Sequence[int] | np.ndarray) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``, exclusive end: the smallest box holding the given masks' boxes."""
        b = self.boxes[np.asarray(indices, dtype=np.int64)]
        return int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())

    def union(self) -> np.ndarray:
        """All masks merged into one ``(H, W)`` bool array."""
        out = np.zeros(self.image_size, dtype=bool)
        for (x0, y0, x1, y1), crop in zip(self.boxes, self.crops):
            out[y0:y1, x0:x1] |= crop
        return out

    def dense(self) -> np.ndarray:
        """``(N, H, W)`` bool stack (memory-heavy; for tests and offline tools)."""
        return np.stack([self.mask(i) for i in range(len(self))]) if len(self) else np.zeros(
            (0, *self.image_size), dtype=bool
        )

    # ------------------------------------------------------------- geometry
    def contains(self, x: int, y: int) -> np.ndarray:
        """``(N,)`` bool: which masks cover pixel column ``x``, row ``y``."""
        b = self.boxes
        inside = (b[:, 0] <= x) & (x < b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 3])
        hits = np.zeros(len(self), dtype=bool)
        for i in np.flatnonzero(inside):
            hits[i] = self.crops[i][y - b[i, 1], x - b[i, 0]]
        return hits

    def box_overlaps(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """``(N,)`` int64 area of each mask's *box* inside ``box``: an upper bound of its pixels there."""
        bx0, by0, bx1, by1 = box
        b = self.boxes.astype(np.int64)
        w = np.clip(np.minimum(b[:, 2], bx1) - np.maximum(b[:, 0], bx0), 0, None)
        h = np.clip(np.minimum(b[:, 3], by1) - np.maximum(b[:, 1], by0), 0, None)
        return w * h

    def box_intersection(self, i: int, box: tuple[int, int, int, int]) -> int:
        """Pixels of mask ``i`` inside ``box`` (``x0, y0, x1, y1``, exclusive end)."""
        bx0, by0, bx1, by1 = box
        x0, y0, x1, y1 = self.boxes[i].tolist()
        ix0, iy0, ix1, iy1 = max(x0, bx0), max(y0, by0), min(x1, bx1), min(y1, by1)
        if ix0 >= ix1 or iy0 >= iy1:
            return 0
        if (ix0, iy0, ix1, iy1) == (x0, y0, x1, y1):
            return int(self.areas[i])  # mask box fully inside the prompt box
        return int(np.count_nonzero(self.crops[i][iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]))

    def box_intersections(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """``(N,)`` int64 pixels of each mask inside ``box`` (``x0, y0, x1, y1``, exclusive end)."""
        out = np.zeros(len(self), dtype=np.int64)
        for i in np.flatnonzero(self.box_overlaps(box)):
            out[i] = self.box_intersection(int(i), box)
        return out

    def iou(self, i: int, j: int) -> float:
        """Pixel IoU of masks ``i`` and ``j`` (only their boxes' overlap is looked at)."""
        return crop_iou(self.boxes[i], self.crops[i], self.boxes[j], self.crops[j],
                        int(self.areas[i]), int(self.areas[j]))

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.crops) + self.boxes.nbytes + self.scores.nbytes


def crop_iou(box_a: np.ndarray, crop_a: np.ndarray, box_b: np.ndarray, crop_b: np.ndarray,
             area_a: int | None = None, area_b: int | None = None) -> float:
    """Pixel IoU of two cropped masks (``x0, y0, x1, y1`` boxes in one image), counted on the
    overlap of their boxes only; pass the areas when they are known."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = np.asarray(box_a).tolist(), np.asarray(box_b).tolist()
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    inter = 0
    if x0 < x1 and y0 < y1:
        a = crop_a[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]
        b = crop_b[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
        inter = int(np.count_nonzero(a & b))
    area_a = int(np.count_nonzero(crop_a)) if area_a is None else area_a
    area_b = int(np.count_nonzero(crop_b)) if area_b is None else area_b
    union = area_a + area_b - inter
    return inter / union if union else 0.0
