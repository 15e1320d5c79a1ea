"""Shared helpers: modes, the run context, timing statistics, the machine description."""

from __future__ import annotations

import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CONF, IOU, MAX_DET = 0.4, 0.9, 300  # the backend's defaults (FastSAM reference values)
CALIBRATION_SEED = 1_000_001  # a held-out scene seed (fastsam_backend.quality.scenes seed ranges)
TARGET_INSTANCES = 105  # "about 100"; a little over so the warm section surely caches >= 100 masks


@dataclass(frozen=True)
class Mode:
    """How much work each section does. ``smoke`` is for the test-suite, ``quick`` < 5 min."""

    name: str
    image_side: int  # warm / cold / throughput images are square
    cold_configs: tuple[tuple[str, int, int], ...]  # (arch, imgsz, repetitions)
    sam_reps: int  # 0 = skip SAM
    warm_imgsz: int
    warm_clicks: int
    warm_brush_regions: int
    nocache_clicks: int  # baseline (a): FastSAM predictor + prompt per click
    sam_clicks: int  # baseline (b): SAM decoder per click
    profile_clicks: int
    rle_side: int  # the big circle is 2 * rle_side
    rle_sdk_reps: int
    rle_reps: int
    cache_reps: int
    redis_sample: int
    throughput: tuple[tuple[int, int], ...]  # (workers, images); () = skip
    onnx_imgsz: int  # 0 = skip
    onnx_reps: int
    warm_arch: str = "s"  # the architecture the warm and throughput sections serve


MODES = {
    "smoke": Mode("smoke", 320, (("n", 320, 1),), 0, 320, 30, 2, 0, 0, 20, 256, 1, 3, 2, 5, (), 0, 0, warm_arch="n"),
    "quick": Mode("quick", 1024, (("s", 640, 2), ("s", 1024, 3), ("x", 640, 1)), 1, 1024, 300, 5, 3, 10, 100,
                  1024, 3, 10, 5, 20, ((1, 3), (2, 4)), 640, 2),
    "full": Mode("full", 1024, (("s", 640, 5), ("s", 1024, 5), ("x", 640, 3), ("x", 1024, 3)), 3, 1024, 1000,
                 5, 10, 20, 300, 1024, 3, 30, 20, 20, ((1, 12), (2, 16)), 1024, 5),
}


@dataclass
class Context:
    """What sections share: the mode, a scratch folder, and results other sections reuse."""

    mode: Mode
    workdir: Path
    shared: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def stats_ms(seconds: list[float]) -> dict[str, float]:
    """Summary of durations in milliseconds: n, mean, median, p95, p99, min, max."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    if ms.size == 0:
        return {"n": 0}
    return {"n": int(ms.size), "mean_ms": round(float(ms.mean()), 3), "p50_ms": round(float(np.median(ms)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "min_ms": round(float(ms.min()), 3), "max_ms": round(float(ms.max()), 3)}


def ratio(reference: float, measured: float) -> float | None:
    """``reference / measured`` (how many times faster ``measured`` is), None if undefined."""
    return round(reference / measured, 2) if measured and reference else None


def scene_image(seed: int, side: int) -> np.ndarray:
    """A generated scene (coloured shapes) as ``(side, side, 3)`` uint8 RGB."""
    from fastsam_backend.quality.scenes import generate_scene

    return generate_scene(seed, (side, side)).image


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """CPU model, cores, torch / ultralytics versions, device: printed with every absolute number."""
    import torch
    import ultralytics

    from fastsam_backend.settings import available_cores

    affinity = available_cores()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(), "cores": affinity, "logical_cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "ultralytics": ultralytics.__version__,
        "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": "cuda:0 " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "loadavg_at_start": [round(v, 2) for v in load] if load else None,
    }


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def calibration_image(ctx: Context) -> np.ndarray:
    """The scene every random-weight model is calibrated on (same for all sections)."""
    if "calibration_image" not in ctx.shared:
        ctx.shared["calibration_image"] = scene_image(CALIBRATION_SEED, ctx.mode.image_side)
    return ctx.shared["calibration_image"]


def model_for(ctx: Context, arch: str, imgsz: int):
    """A random-weight checkpoint of ``arch`` calibrated for ``imgsz`` (built once, then reused)."""
    from .models import checkpoint

    key = ("model", arch, imgsz)
    if key not in ctx.shared:
        cache_dir = ctx.shared.get("model_cache_dir", ctx.workdir / "models")
        ctx.log(f"  random-weight {arch} checkpoint for imgsz {imgsz} (built once, cached in {cache_dir}) ...")
        seconds, ctx.shared[key] = timed(lambda: checkpoint(
            Path(cache_dir), arch, imgsz, calibration_image(ctx), conf=CONF, iou=IOU, max_det=MAX_DET,
            target=TARGET_INSTANCES, bases=ctx.shared.setdefault("bases", {})))
        ctx.shared["model_build_s"] = ctx.shared.get("model_build_s", 0.0) + seconds
    return ctx.shared[key]


def segmenter_for(built, imgsz: int, device: str = "auto"):
    """Our ``Segmenter`` over a built checkpoint, with the backend's default thresholds."""
    from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig

    return Segmenter(SegmenterConfig(weights=str(built.path), model_dir=built.path.parent, device=device,
                                     imgsz=imgsz, conf=CONF, iou=IOU, max_det=MAX_DET, allow_download=False))
