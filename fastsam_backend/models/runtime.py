"""Which runtime serves a ``.pt`` checkpoint on a CPU: its ONNX Runtime export, made once, when it
gives torch's masks (``FASTSAM_RUNTIME``: ``auto`` | ``torch`` | ``onnx``).

ONNX Runtime runs FastSAM's everything pass with the same masks as fast as torch or a little faster,
and steadier, on 2-core CPUs (2-core AMD EPYC, FastSAM-s at 1024, each runtime in its own process:
p50 370-380 ms against torch's 389-461 ms, torch spreading over 323-535 ms; the 1.35-1.9x measured
before 2026-12-04 compared with torch on one core of two, ``segmenter.torch_threads_kept``), but
released weights are ``.pt``. With ``auto`` (the default) and a
``.pt`` on a CPU, the loader exports it once into ``MODEL_DIR`` as
``<stem>-<digest of the .pt>.onnx`` (dynamic axes; written under a temporary name, then renamed:
atomic, so every worker and replica sharing the folder reuses one file, and a replaced ``.pt`` gets
its own export), segments a check image with both and serves the export only when every torch
instance comes back (as many instances, pooled mask IoU ≥ ``CHECK_IOU``, none below
``CHECK_WORST_IOU``: on 1024² images a mask of ~100 px loses 0.01 per pixel). The verdict is written
beside the export (``.onnx.json``, with the library versions it holds for), so the check runs once
per folder and versions. A folder that cannot be written, a missing ``onnx`` package or a failed
check serve torch, with one log line saying why; ``onnx`` makes each of those an error instead.

Identity: an export that passed the check serves under the ``.pt``'s identity (same
``model_version``, same mask cache keys), so a replica that fell back to torch and one serving
the export share the cache: the check is what makes them interchangeable. A GPU keeps torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fastsam_backend.core.boxmatch import box_box_ious
from fastsam_backend.core.masks import MaskSet, crop_iou
from fastsam_backend.errors import ModelUnavailable
from fastsam_backend.models.digest import file_digest

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")
CHECK_IOU = 0.999  # all instances' pixels pooled
CHECK_WORST_IOU = 0.98  # any single instance (a pixel or two on a ~100 px mask)


def check_image(side: int = 640) -> np.ndarray:
    """A fixed image of coloured shapes on a gradient (``(side, side, 3)`` uint8): something for
    both runtimes to segment; the same bytes on every machine."""
    rng = np.random.default_rng(20251203)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    image = np.stack([180 * xx + 40, 160 * yy + 50, 120 * (1 - xx) + 60], axis=-1)
    for _ in range(18):
        color = rng.integers(0, 256, 3)
        cx, cy = rng.integers(side // 10, side - side // 10, 2)
        r = int(rng.integers(side // 24, side // 7))
        if rng.random() < 0.5:
            inside = (xx * side - cx) ** 2 + (yy * side - cy) ** 2 <= r * r
        else:
            inside = (abs(xx * side - cx) <= r) & (abs(yy * side - cy) <= r * 0.6)
        image[inside] = color
    return image.clip(0, 255).astype(np.uint8)


def agreement(ref: MaskSet, other: MaskSet) -> tuple[float, float]:
    """``(overall, worst)`` mask IoU of ``ref``'s instances with their best box match in
    ``other``: pixels of all instances pooled (Σ intersection / Σ union), and the smallest single
    instance's. ``(1, 1)`` when both are empty, ``(0, 0)`` when the counts differ."""
    if len(ref) != len(other):
        return 0.0, 0.0
    inter = union = 0.0
    worst = 1.0
    for i in range(len(ref)):
        j = int(np.argmax(box_box_ious(other, tuple(int(v) for v in ref.boxes[i]))))
        iou = crop_iou(ref.boxes[i], ref.crops[i], other.boxes[j], other.crops[j])
        both = float(ref.areas[i] + other.areas[j])
        inter_i = iou * both / (1 + iou)  # |A∩B| from IoU and |A| + |B|
        inter, union, worst = inter + inter_i, union + both - inter_i, min(worst, iou)
    return (inter / union if union else 1.0), float(worst)


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch
    import ultralytics

    return {"ultralytics": ultralytics.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


class ExportUnavailable(Exception):
    """Why an export cannot be had: a folder that cannot be written, an exporter failure."""


def export_once(target: Path, export: Callable[[], None], versions: Callable[[], dict[str, str]],
                what: str) -> tuple[dict[str, str], dict[str, Any]]:
    """``(versions(), verdict)``: ``target`` made by ``export()`` (which writes it atomically) unless
    it exists, and the verdict kept beside it (``.onnx.json``; ``{}`` when there is none yet).
    ``what`` names the export in the log line. Raises ``ExportUnavailable`` saying why not."""
    verdict_file = target.with_suffix(".onnx.json")
    try:
        found = versions()
        if not target.is_file():
            log.info("exporting %s to ONNX Runtime once (%s)", what, target)
            export()
        return found, json.loads(verdict_file.read_text()) if verdict_file.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ExportUnavailable(f"the ONNX export could not be written into {target.parent} ({exc})") from exc
    except Exception as exc:  # a missing onnx package, an exporter failure: many types
        raise ExportUnavailable(f"the ONNX export failed ({type(exc).__name__}: {exc})") from exc


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """``data`` written to ``path`` through a temporary name and a rename; an unwritable folder is
    left alone (the next process checks again: a cost, not an error)."""
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass


def export_path(pt: Path, model_dir: Path) -> Path:
    return model_dir / f"{pt.stem}-{file_digest(pt)}.onnx"


def _export(pt: Path, target: Path, imgsz: int) -> None:
    """``pt`` exported to ``target`` atomically (a temporary folder beside it, then a rename)."""
    from ultralytics import YOLO

    target.parent.mkdir(parents=True, exist_ok=True)  # MODEL_DIR as released weights would make it
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        staged = tmp / f"{target.stem}.pt"
        shutil.copyfile(pt, staged)
        made = Path(YOLO(str(staged)).export(format="onnx", imgsz=imgsz, dynamic=True, device="cpu", verbose=False))
        os.replace(made, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def serve_onnx(runtime: str, pt: Path, model_dir: Path, imgsz: int, torch_model: Any,
               segment: Callable[[Any, np.ndarray], MaskSet]) -> Any:
    """The ONNX model to serve instead of ``torch_model`` (a loaded ``FastSAM``), or None for torch.

    ``segment(model, image)`` is the segmenter's own everything pass, so the check compares what
    would be served. ``runtime`` 'onnx' raises ``ModelUnavailable`` where 'auto' falls back.
    """
    if runtime == "torch" or pt.suffix != ".pt":
        return None

    def fallback(why: str) -> None:
        if runtime == "onnx":
            raise ModelUnavailable(f"FASTSAM_RUNTIME=onnx: {why}")
        log.warning("FASTSAM_RUNTIME=auto: serving torch, %s", why)

    target = export_path(pt, model_dir)
    try:
        versions, verdict = export_once(target, lambda: _export(pt, target, imgsz), _versions, pt.name)
    except ExportUnavailable as exc:
        return fallback(f"MODEL_DIR={model_dir}: {exc}")
    from ultralytics import FastSAM

    try:
        onnx_model = FastSAM(str(target))
    except Exception as exc:  # a truncated or foreign file
        return fallback(f"'{target}' could not be loaded ({exc}); delete it to export again")
    if verdict.get("versions") != versions or verdict.get("imgsz") != imgsz:
        image = check_image()
        overall, worst = agreement(segment(torch_model, image), segment(onnx_model, image))
        verdict = {"mask_iou": round(overall, 6), "min_mask_iou": round(worst, 6), "imgsz": imgsz,
                   "passed": overall >= CHECK_IOU and worst >= CHECK_WORST_IOU, "versions": versions}
        write_json_atomic(target.with_suffix(".onnx.json"), verdict)
    if not verdict.get("passed"):
        return fallback(f"the ONNX export's masks differ from torch's on the check image (mask IoU "
                        f"{verdict.get('mask_iou')}, worst instance {verdict.get('min_mask_iou')}; needs >= "
                        f"{CHECK_IOU} and >= {CHECK_WORST_IOU})")
    log.info("serving %s through ONNX Runtime (check image: mask IoU %s, worst instance %s; identity of %s kept)",
             target.name, verdict.get("mask_iou"), verdict.get("min_mask_iou"), pt.name)
    return onnx_model
