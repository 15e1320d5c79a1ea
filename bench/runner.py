"""Runs the sections in order, each isolated: a failure is recorded and the run goes on."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import MODES, Context, machine

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"
SECTIONS = ("cold", "warm", "rle", "cache", "throughput", "onnx", "queue", "load", "burst",
            "mobilesam", "int8", "clicks",  # issue #16: MobileSAM peer, int8 path, clicks under concurrency
            "defaults",  # issue #25: the default architectures with CLIP
            "exemplars")  # issue #26: an exemplar prompt's answer vs a warm click


def _section(name: str) -> Callable[[Context], dict[str, Any]]:
    import importlib

    return importlib.import_module(f"bench.{name}").run


def _run_one(ctx: Context, name: str) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = _section(name)(ctx)
        status = "skipped" if "skipped" in result else "error" if "error" in result else "ok"
    except Exception as exc:  # recorded in the JSON; the next section still runs
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
        status = "error"
    return {"status": status, "seconds": round(time.perf_counter() - started, 1), **result}


def _prepare_threads() -> None:
    """Every core for torch, and kept there: ultralytics' ``select_device`` (predictor set-up,
    export, calibration) sets ``min(8, cores - 1)`` threads, 1 on 2 cores, which ran every torch
    peer measured after it (SAM, MobileSAM, FastSAM on torch) on half the machine until
    2026-12-04. The backend keeps its own plan (``segmenter.torch_threads_kept``); the bench calls
    ultralytics directly too, so here every module's ``select_device`` keeps the count."""
    import importlib

    import torch

    from fastsam_backend.models.segmenter import torch_threads_kept
    from fastsam_backend.settings import available_cores

    torch.set_num_threads(available_cores())
    from ultralytics.utils import torch_utils

    original = getattr(torch_utils.select_device, "__wrapped__", torch_utils.select_device)

    def select_device(*args: Any, **kwargs: Any) -> Any:
        with torch_threads_kept():
            return original(*args, **kwargs)

    select_device.__wrapped__ = original  # type: ignore[attr-defined]
    for name in ("utils.torch_utils", "engine.predictor", "engine.exporter", "engine.trainer", "engine.validator"):
        importlib.import_module(f"ultralytics.{name}").select_device = select_device  # bound by name at import


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_bench(mode: str = "quick", out: Path | None = None, sections: tuple[str, ...] = SECTIONS,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``sections`` in ``mode`` ('smoke', 'quick', 'full'); write the JSON to ``out``; return it."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach for the network (ultralytics checks/downloads)
    os.environ.setdefault("YOLO_VERBOSE", "False")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out) if out else DEFAULT_OUT
    _prepare_threads()
    started = time.perf_counter()
    result: dict[str, Any] = {"schema": 1, "mode": mode, "started": dt.datetime.now(dt.timezone.utc).isoformat(),
                              "machine": machine(), "out": str(out), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="fastsam-bench-") as tmp:
        ctx = Context(MODES[mode], Path(tmp), log=log)
        # random checkpoints are reused between runs; absolute: the clicks section serves the base commit
        # from another folder
        ctx.shared["model_cache_dir"] = out.resolve().parent / "models"
        for name in SECTIONS:
            if name not in sections:
                result["sections"][name] = {"status": "skipped", "skipped": "not selected"}
                continue
            log(f"[bench] {name} ...")
            result["sections"][name] = _run_one(ctx, name)
            result["sections"][name]["torch_threads_at_end"] = _torch_threads()
            log(f"[bench] {name}: {result['sections'][name]['status']} "
                f"in {result['sections'][name]['seconds']} s")
        result["model_build_s"] = round(ctx.shared.get("model_build_s", 0.0), 1)  # 0 when all were cached
    result["duration_s"] = round(time.perf_counter() - started, 1)
    result["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    result["finished"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    result["headlines"] = [dict(section=k, **v["headline"]) for k, v in result["sections"].items()
                           if isinstance(v.get("headline"), dict)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return result
