"""YOLO-seg data sets (one class, "object") from images and masks, and ultralytics made offline.

Shared by ``scripts/train_fastsam_fixture.py`` (generated scenes) and ``finetune.train`` (a
project's accepted masks): polygon labels keep holes (``yolo_segment``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def _splice(poly: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Join ``other`` into ``poly`` through a zero-width bridge between their closest points."""
    d = ((poly[:, None, :].astype(np.float64) - other[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return np.concatenate([poly[: i + 1], other[j:], other[: j + 1], poly[i:]], axis=0)


def yolo_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Polygons (``(N, 2)`` float32, x, y pixels) of a mask, one per connected piece.

    Each piece's holes are joined into its outline through zero-width bridges
    (like ultralytics' ``merge_multi_segment`` for COCO), so a filled polygon
    (even-odd or non-zero) reproduces the hole: rings are learned with holes.
    """
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    hierarchy = hierarchy[0]
    out = []
    for k, (_, _, first_child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        poly = contours[k][:, 0, :].astype(np.float32)
        child = first_child
        while child != -1:
            hole = contours[child][:, 0, :].astype(np.float32)
            if len(hole) >= 3:
                poly = _splice(poly, hole)
            child = hierarchy[child][0]
        if len(poly) >= 3:
            out.append(poly)
    return out


def yolo_segment(mask: np.ndarray) -> np.ndarray | None:
    """One polygon for a YOLO-seg label line: :func:`yolo_polygons` joined into one outline."""
    polys = sorted(yolo_polygons(mask), key=len, reverse=True)
    if not polys:
        return None
    poly = polys[0]
    for other in polys[1:]:
        poly = _splice(poly, other)
    return poly



def label_lines(masks: Sequence[np.ndarray], h: int, w: int) -> list[str]:
    """One ``0 x y x y ...`` line (normalised polygon, holes spliced in) per mask with an outline."""
    lines = []
    for mask in masks:
        poly = yolo_segment(mask)
        if poly is None or len(poly) < 3:
            continue
        xy = np.clip(poly / np.array([w, h], np.float32), 0.0, 1.0)
        lines.append("0 " + " ".join(f"{v:.6f}" for v in xy.reshape(-1)))
    return lines


def write_example(images: str, labels: str, name: str, image: np.ndarray, masks: Sequence[np.ndarray]) -> int:
    """``images/<name>.png`` (RGB in) and ``labels/<name>.txt``; returns the number of label lines."""
    h, w = image.shape[:2]
    cv2.imwrite(os.path.join(images, f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_PNG_COMPRESSION, 1])
    lines = label_lines(masks, h, w)
    with open(os.path.join(labels, f"{name}.txt"), "w") as f:
        f.write("\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def split_dirs(root: Path, split: str) -> tuple[str, str]:
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    return str(images), str(labels)


def write_yaml(root: Path, splits: Sequence[str]) -> Path:
    yaml = root / "data.yaml"
    lines = [f"path: {root}"] + [f"{split}: images/{split}" for split in splits] + ["names:", "  0: object"]
    yaml.write_text("\n".join(lines) + "\n")
    return yaml


def write_samples(root: Path, splits: dict[str, Sequence[Any]]) -> Path:
    """Each split's samples (``.image``, ``.masks``) as a data set under ``root``; returns the yaml."""
    for split, samples in splits.items():
        images, labels = split_dirs(root, split)
        for i, sample in enumerate(samples):
            write_example(images, labels, f"{i:07d}", sample.image, sample.masks)
    return write_yaml(root, list(splits))


def offline_ultralytics() -> None:
    """Stub the one remaining network touch: the data-set loader's Arial.ttf font check.

    Also, where polars is missing (a bare GPU machine with wheels carried in), read
    results.csv with the stdlib: ultralytics only embeds it in each checkpoint.
    """
    import ultralytics.data.utils as data_utils

    data_utils.check_font = lambda *a, **k: None
    try:
        import polars  # noqa: F401
    except ImportError:
        import csv

        from ultralytics.engine.trainer import BaseTrainer

        def read_results_csv(self) -> dict:
            try:
                with open(self.csv, newline="") as f:
                    rows = list(csv.DictReader(f))
            except OSError:
                return {}
            return {k.strip(): [float(r[k]) for r in rows] for k in (rows[0] if rows else {})}

        BaseTrainer.read_results_csv = read_results_csv


def set_names(path: Path, names: dict[int, str] | None = None) -> None:
    """Name the single class "object" (as FastSAM does) in a stripped checkpoint."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "ema"):
        if ckpt.get(key) is not None:
            ckpt[key].names = names or {0: "object"}
    torch.save(ckpt, path)
