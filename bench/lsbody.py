"""Realistic Label Studio ``/predict`` bodies for the warm-click section.

The template is a request Label Studio 1.23.2 really sent
(``fastsam_backend/quality/ls-requests.json``); the task is made heavy the way a task in
progress is: several full-image BrushLabels regions (annotations and
predictions), each a long RLE int list, that LS sends along with every click.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.ls.rle import encode_rle
from fastsam_backend.quality.lsrequests import brush, captured, keypoint, rectangle  # noqa: F401 - re-exported

IMAGE_URL = "/data/upload/1/bench-warm.png"
BRUSH_RLE_INTS = 25_000  # ~100 KB of JSON per brush region


def brush_masks(masks: MaskSet, count: int, rng: np.random.Generator, min_ints: int = BRUSH_RLE_INTS
                ) -> list[np.ndarray]:  # fmt: skip
    """``count`` full-image masks, each a union of instances, grown until its RLE has ``min_ints`` ints."""
    out = []
    for _ in range(count):
        mask = np.zeros(masks.image_size, dtype=bool)
        order = rng.permutation(len(masks))
        for i in order[: max(1, len(order))]:  # bounded by the instance count
            x0, y0, x1, y1 = masks.boxes[i]
            mask[y0:y1, x0:x1] ^= masks.crops[i]  # XOR: overlaps make holes, as edited brushes do
            if len(encode_rle(mask)) >= min_ints:
                break
        out.append(mask)
    return out


def prompts(masks: MaskSet, n: int, rng: np.random.Generator, box_share: float = 0.3,
            on_object_share: float = 0.8) -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
    """``n`` varied prompts: clicks on random instances (or anywhere), boxes around instances (jittered)."""
    h, w = masks.image_size
    out: list[tuple[str, dict[str, Any]]] = []
    for _ in range(n):
        i = int(rng.integers(len(masks))) if len(masks) else -1
        if i >= 0 and rng.random() < box_share:
            x0, y0, x1, y1 = (int(v) for v in masks.boxes[i])
            jx, jy = max(1, (x1 - x0) // 20), max(1, (y1 - y0) // 20)
            bx0 = int(np.clip(x0 + rng.integers(-jx, jx + 1), 0, w - 2))
            by0 = int(np.clip(y0 + rng.integers(-jy, jy + 1), 0, h - 2))
            bx1 = int(np.clip(x1 + rng.integers(-jx, jx + 1), bx0 + 1, w))
            by1 = int(np.clip(y1 + rng.integers(-jy, jy + 1), by0 + 1, h))
            out.append(("box", rectangle(bx0, by0, bx1, by1, w, h)))
        elif i >= 0 and rng.random() < on_object_share:
            ys, xs = np.nonzero(masks.crops[i])
            k = int(rng.integers(len(xs)))
            out.append(("click", keypoint(int(xs[k] + masks.boxes[i, 0]), int(ys[k] + masks.boxes[i, 1]), w, h)))
        else:
            out.append(("click", keypoint(int(rng.integers(w)), int(rng.integers(h)), w, h)))
    return out


def predict_body(context_region: dict[str, Any], brushes: list[dict[str, Any]],
                 image_url: str = IMAGE_URL) -> dict[str, Any]:  # fmt: skip
    """The captured interactive /predict body, on our image, carrying ``brushes`` (3/5 annotation, rest prediction)."""
    body = captured("/predict", interactive=True)
    task = body["tasks"][0]
    task["data"]["image"] = image_url
    split = (len(brushes) * 3 + 4) // 5
    task["annotations"] = [{"id": 1, "result": brushes[:split], "completed_by": 1, "was_cancelled": False}]
    task["predictions"] = [{"id": 1, "result": brushes[split:], "model_version": "earlier", "score": 0.5}]
    body["params"]["context"]["result"] = [context_region]
    return body
