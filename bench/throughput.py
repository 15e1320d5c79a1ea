"""Section 5 — batch pre-annotation throughput and worker memory.

``POST /predict`` without a context (LS "Retrieve predictions"): every instance as
a BrushLabels region. Distinct images, so every request runs the model. Measured
with 1 and 2 gunicorn workers (each loads its own model); the client keeps two
requests in flight per worker. Peak RSS is ``VmHWM`` of each worker from /proc.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fastsam_backend.quality.lsrequests import png_bytes

from .common import REDIS_URL, Context, calibration_image, model_for, scene_image
from .lsbody import captured
from .servers import backend, peak_rss_mb, redis_prefix, static_server

FIRST_SEED = 1_000_500  # held-out scenes, distinct from the calibration image
WARMUP_STRIP = 64  # rows of the warm-up images


def _body(url: str) -> bytes:
    body = captured("/predict", interactive=False)
    body["tasks"][0]["data"]["image"] = url
    return json.dumps(body).encode()


def _one_setting(ctx: Context, workers: int, n_images: int, seed0: int, root, ls_base: str) -> dict[str, Any]:
    import requests

    built = model_for(ctx, ctx.mode.warm_arch, ctx.mode.warm_imgsz)
    urls = []
    for i in range(workers + n_images):
        name = f"data/upload/2/bench-{seed0 + i}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image = scene_image(seed0 + i, ctx.mode.image_side)
        if i < workers:  # warm-up (model load): a thin strip, so the network pass on it is cheap
            image = np.ascontiguousarray(image[:WARMUP_STRIP])
        (root / name).write_bytes(png_bytes(image))
        urls.append("/" + name)
    bodies = [_body(u) for u in urls]
    headers = {"Content-Type": "application/json"}
    with redis_prefix() as (_client, prefix):
        env = {"FASTSAM_WEIGHTS": str(built.path), "IMGSZ": str(ctx.mode.warm_imgsz), "REDIS_URL": REDIS_URL,
               "CACHE_PREFIX": prefix, "LABEL_STUDIO_URL": ls_base, "LABEL_STUDIO_API_KEY": "f" * 40,
               "WORKERS": str(workers), "THREADS": "4", "TIMEOUT_S": "600"}
        with backend(env, ctx.workdir) as server:

            def post(body: bytes) -> tuple[float, int]:
                started = time.perf_counter()
                response = requests.post(f"{server.base}/predict", data=body, headers=headers, timeout=600)
                response.raise_for_status()
                return time.perf_counter() - started, len(response.json()["results"][0]["result"])

            with ThreadPoolExecutor(max_workers=2 * workers) as pool:
                list(pool.map(post, bodies[:workers]))  # may not reach every worker: then one loads while timed
                started = time.perf_counter()
                done = list(pool.map(post, bodies[workers:]))
                wall = time.perf_counter() - started
            pids = server.worker_pids()
            rss = {str(pid): peak_rss_mb(pid) for pid in pids}
    regions = [n for _, n in done]
    return {"workers": workers, "threads": 4, "images": n_images, "wall_s": round(wall, 2),
            "images_per_minute": round(60 * n_images / wall, 2),
            "request_s_median": round(sorted(t for t, _ in done)[len(done) // 2], 2),
            "regions_per_image_mean": round(sum(regions) / len(regions), 1),
            "worker_peak_rss_mb": rss, "max_worker_peak_rss_mb": max((v for v in rss.values() if v), default=None)}


def run(ctx: Context) -> dict[str, Any]:
    if not ctx.mode.throughput:
        return {"skipped": f"not run in {ctx.mode.name} mode"}
    calibration_image(ctx)
    root = ctx.workdir / "served"
    out: dict[str, Any] = {"settings": {}, "errors": {}}
    with static_server(root) as ls_base:
        for k, (workers, n_images) in enumerate(ctx.mode.throughput):
            ctx.log(f"  throughput: {workers} worker(s), {n_images} images")
            try:
                out["settings"][f"{workers}_workers"] = _one_setting(ctx, workers, n_images, FIRST_SEED + 100 * k,
                                                                     root, ls_base)
            except Exception as exc:
                out["errors"][f"{workers}_workers"] = f"{type(exc).__name__}: {exc}"
    one, two = out["settings"].get("1_workers"), out["settings"].get("2_workers")
    if one:
        out["headline"] = {"name": f"batch pre-annotation, 1 worker (imgsz {ctx.mode.warm_imgsz})",
                           "value": one["images_per_minute"], "unit": "images/min", "target": "report",
                           "met": None, "absolute": f"peak RSS {one['max_worker_peak_rss_mb']} MiB per worker"
                           + (f"; 2 workers: {two['images_per_minute']} images/min = "
                              f"{two['images_per_minute'] / one['images_per_minute']:.2f}x" if two else "")}
    return out
