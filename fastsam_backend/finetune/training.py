"""FastSAM fine-tuning on a project's accepted masks: evaluate, decide, train (issue #17 part 3).

- ``evaluate(checkpoint, samples)``: recall at IoU 0.5 (a ground-truth mask is found when one of
  the checkpoint's instance masks overlaps it with IoU >= 0.5) and mean click IoU (one positive
  click at the deepest interior pixel of each ground-truth mask, answered by the backend's own
  ``select_by_points`` over the ``Segmenter``'s ``MaskSet``).
- ``decide(base, tuned, n_heldout)``: adopt only when the tuned checkpoint beats the base by
  ``margin`` on *both* figures, on a held-out set of at least ``min_heldout`` masks.
- ``train(base, samples, out_dir, ...)``: ultralytics training, class-agnostic (one class
  "object", as FastSAM and the fixture are), a fixed small budget, on a YOLO-seg data set written
  by ``dataset.py`` (the same writer the fixture script uses).

Everything crossing a boundary is a dataclass with ``to_dict``/``from_dict`` (JSON in Redis).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastsam_backend.models.digest import file_digest

DEFAULT_MARGIN = 0.02
DEFAULT_MIN_HELDOUT = 20  # ground-truth masks in the held-out set


@dataclass(frozen=True)
class Sample:
    """One annotated image: ``image`` (H, W, 3) uint8 RGB, ``masks`` (H, W) bool each."""

    image: np.ndarray
    masks: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Figures:
    recall50: float
    click_iou: float
    n_masks: int
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Figures:
        return cls(float(d["recall50"]), float(d["click_iou"]), int(d["n_masks"]), int(d["n_images"]))


@dataclass(frozen=True)
class Decision:
    adopt: bool
    reason: str
    base: Figures
    tuned: Figures
    n_heldout: int
    margin: float
    min_heldout: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["base"], d["tuned"] = self.base.to_dict(), self.tuned.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        return cls(bool(d["adopt"]), str(d["reason"]), Figures.from_dict(d["base"]), Figures.from_dict(d["tuned"]),
                   int(d["n_heldout"]), float(d["margin"]), int(d["min_heldout"]))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def segmenter_for(checkpoint: Path | str, *, imgsz: int = 640, conf: float = 0.1, iou: float = 0.7,
                  device: str = "cpu") -> Any:
    """A backend ``Segmenter`` on ``checkpoint`` (no downloads)."""
    from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig

    path = Path(checkpoint)
    return Segmenter(SegmenterConfig(weights=str(path), model_dir=path.parent, device=device, imgsz=imgsz,
                                     conf=conf, iou=iou, allow_download=False))


def evaluate(checkpoint: Path | str | Any, samples: Sequence[Sample], **segmenter_kw: Any) -> Figures:
    """Recall at IoU 0.5 and mean click IoU of ``checkpoint`` (a path or a ``Segmenter``) on ``samples``."""
    from fastsam_backend.core.geometry import click_points
    from fastsam_backend.core.selection import select_by_points

    segmenter = checkpoint if hasattr(checkpoint, "segment") else segmenter_for(checkpoint, **segmenter_kw)
    hits: list[bool] = []
    clicks: list[float] = []
    rng = np.random.default_rng(0)
    for sample in samples:
        found = segmenter.segment(sample.image)
        dense = [found.mask(i) for i in range(len(found))]
        for gt in sample.masks:
            hits.append(any(_iou(m, gt) >= 0.5 for m in dense))
            x, y = click_points(gt, rng, n_random=0)[0]
            chosen = select_by_points(found, np.array([[x, y]]), np.array([True]))
            clicks.append(_iou(chosen.mask, gt) if chosen is not None else 0.0)
    return Figures(float(np.mean(hits)) if hits else 0.0, float(np.mean(clicks)) if clicks else 0.0,
                   len(hits), len(samples))


def decide(base: Figures, tuned: Figures, n_heldout: int, *, min_heldout: int = DEFAULT_MIN_HELDOUT,
           margin: float = DEFAULT_MARGIN) -> Decision:
    """Adopt ``tuned`` only if it beats ``base`` by ``margin`` on recall@0.5 and on click IoU, measured
    on at least ``min_heldout`` held-out masks; otherwise reject, saying why."""
    def out(adopt: bool, reason: str) -> Decision:
        return Decision(adopt, reason, base, tuned, n_heldout, margin, min_heldout)

    if n_heldout < min_heldout:
        return out(False, f"held-out set too small: {n_heldout} masks < {min_heldout}")
    d_recall, d_click = tuned.recall50 - base.recall50, tuned.click_iou - base.click_iou
    gains = f"recall50 {base.recall50:.3f} -> {tuned.recall50:.3f}, click IoU {base.click_iou:.3f} -> " \
            f"{tuned.click_iou:.3f} (margin {margin:g})"
    if d_recall < margin or d_click < margin:
        return out(False, f"not better by the margin on both: {gains}")
    return out(True, f"better on both: {gains}")


def split(samples: Sequence[Any], keys: Sequence[str], heldout_fraction: float = 0.3) -> tuple[list, list]:
    """Deterministic train/held-out split: a sample is held out when the digest of its key falls
    in the held-out fraction (the same image is always on the same side, whatever else is added)."""
    import hashlib

    train_set, held = [], []
    for sample, key in zip(samples, keys):
        bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if bucket < heldout_fraction else train_set).append(sample)
    return train_set, held


def train(base_checkpoint: Path | str, samples: Sequence[Sample], out_dir: Path | str, *, epochs: int = 3,
          imgsz: int = 640, device: str = "cpu", batch: int = 8, hours: float = 0.0, lr0: float = 0.0005,
          val_samples: Sequence[Sample] | None = None) -> Path:
    """Fine-tune ``base_checkpoint`` on ``samples`` (one class, "object"); returns the stripped
    checkpoint ``out_dir/finetuned-<digest12>.pt``. The budget is ``epochs`` (and ``hours`` when > 0);
    AdamW at a small ``lr0`` (a fine-tune, not a re-training: ultralytics' auto optimizer's larger
    rates undo what the checkpoint knew, measured in docs/fine-tuning.md)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from fastsam_backend.finetune.dataset import offline_ultralytics, set_names, write_samples

    out_dir = Path(out_dir).resolve()
    data_root = out_dir / "data"
    splits = {"train": list(samples), "val": list(val_samples or samples[: max(1, len(samples) // 4)])}
    data = write_samples(data_root, splits)
    offline_ultralytics()
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import strip_optimizer

    from fastsam_backend.models.segmenter import torch_threads_kept

    model = YOLO(str(base_checkpoint), task="segment")
    with torch_threads_kept():  # training takes ultralytics' thread count; the worker's serving keeps its own
        model.train(data=str(data), epochs=epochs, time=hours or None, imgsz=imgsz, batch=batch, nbs=batch,
                    device=device, workers=0, seed=0, deterministic=True, pretrained=True, amp=False, plots=False,
                    optimizer="AdamW", lr0=lr0,
                    warmup_epochs=0, close_mosaic=0, patience=1000, project=str(out_dir / "runs"), name="ft",
                    exist_ok=True, verbose=False, val=True)
    weights = out_dir / "runs" / "ft" / "weights"
    best = weights / "best.pt" if (weights / "best.pt").exists() else weights / "last.pt"
    tmp = out_dir / f"finetuned-{int(time.time() * 1000)}.pt"
    strip_optimizer(best, str(tmp))
    set_names(tmp)
    final = out_dir / f"finetuned-{file_digest(tmp)[:12]}.pt"
    tmp.replace(final)
    shutil.rmtree(out_dir / "runs", ignore_errors=True)
    shutil.rmtree(data_root, ignore_errors=True)
    return final
