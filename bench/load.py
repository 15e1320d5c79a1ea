"""Section ``load`` — many interactive requests on cached images, through gunicorn and Redis.

``concurrency`` clients (one keep-alive session each) send ``requests`` click / box prompts in
Label Studio's real ``/predict`` body (``bench/lsbody.py``: the captured request, carrying brush
regions in the task as a task in progress does) on a few cached images (the trained fixture
model, generated scenes). Reported: client-side p50/p95/p99, errors (any answer but a 200 with a
region list, or a connection error), requests/s, and each worker's RSS after the warm-up and at the
end. The short form is ``tests/test_load.py``; the full one a command:

    python -m bench.load --requests 20000 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fastsam_backend.quality.fake import GroundTruthSegmenter
from fastsam_backend.quality.lsrequests import png_bytes
from fastsam_backend.quality.scenes import generate_scene

from .common import REDIS_URL, Context, stats_ms
from .lsbody import brush, brush_masks, predict_body, prompts
from .servers import REPO, Backend, backend, redis_prefix, static_server, status_mb, wait_loaded

FIXTURE = REPO / "tests" / "fixtures" / "models" / "fastsam-shapes.pt"
REQUESTS = {"smoke": 200, "quick": 2000, "full": 20000}
SCENE_SEEDS = (1_000_101, 1_000_102, 1_000_103, 1_000_104)  # held-out seeds, 640x480
BRUSHES, BRUSH_RLE_INTS = 3, 2_000  # regions LS sends along with each click (~25 KB of JSON)
WARMUP = 100


def bodies(root: Path, count: int, seed: int = 13) -> list[bytes]:
    """Write the scenes under ``root/data/upload/1/`` and return ``count`` serialized /predict bodies."""
    rng = np.random.default_rng(seed)
    folder = root / "data" / "upload" / "1"
    folder.mkdir(parents=True, exist_ok=True)
    per_image = []
    for seed_ in SCENE_SEEDS:
        scene = generate_scene(seed_, (480, 640))
        (folder / f"load-{seed_}.png").write_bytes(png_bytes(scene.image))
        masks = GroundTruthSegmenter([scene]).segment(scene.image)  # where the objects are: prompts hit them
        brushes = [brush(m, i) for i, m in enumerate(brush_masks(masks, BRUSHES, rng, BRUSH_RLE_INTS))]
        url = f"/data/upload/1/load-{seed_}.png"
        per_image.append([json.dumps(predict_body(region, brushes, url)).encode()
                          for _, region in prompts(masks, max(1, count // len(SCENE_SEEDS)) + 1, rng)])
    return [per_image[i % len(per_image)][i // len(per_image)] for i in range(count)]


def drive(base: str, payloads: list[bytes], concurrency: int, timeout_s: float = 60) -> dict[str, Any]:
    """POST every payload to ``base/predict`` from ``concurrency`` threads; latencies and errors."""
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    lock, local = threading.Lock(), threading.local()
    headers = {"Content-Type": "application/json"}

    def one(payload: bytes) -> None:
        session = getattr(local, "session", None) or setattr(local, "session", requests.Session()) or local.session
        started = time.perf_counter()
        try:
            response = session.post(f"{base}/predict", data=payload, headers=headers, timeout=timeout_s)
            ok = response.status_code == 200 and isinstance(response.json()["results"][0]["result"], list)
            why = None if ok else f"HTTP {response.status_code}: {response.text[:200]}"
        except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - started
        with lock:
            (errors.append(why) if why else latencies.append(elapsed))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, payloads))
    wall = time.perf_counter() - started
    return {"requests": len(payloads), "ok": len(latencies), "errors": len(errors), "first_errors": errors[:5],
            "wall_s": round(wall, 2), "requests_per_s": round(len(payloads) / wall, 1), **stats_ms(latencies)}


def workers_rss(server: Backend) -> dict[int, float | None]:
    return {pid: status_mb(pid, "VmRSS") for pid in server.worker_pids()}


def measure(workdir: Path, count: int, concurrency: int = 8, redis_url: str = REDIS_URL, workers: int = 1,
            log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Start the backend on the fixture model with Redis, warm the images, drive ``count`` requests."""
    root = workdir / "served"
    payloads = bodies(root, count + WARMUP)
    with static_server(root) as ls_base, redis_prefix(redis_url) as (_, prefix):
        env = {"FASTSAM_WEIGHTS": str(FIXTURE), "IMGSZ": "640", "CONF": "0.1", "IOU": "0.7", "CLIP_ENABLED": "false",
               "DEFAULT_LABEL": "Banana", "REDIS_URL": redis_url, "CACHE_PREFIX": prefix, "LABEL_STUDIO_URL": ls_base,
               "LABEL_STUDIO_API_KEY": "f" * 40, "WORKERS": str(workers), "THREADS": "4"}
        with backend(env, workdir) as server:
            wait_loaded(server)
            warm = drive(server.base, payloads[:WARMUP], concurrency)  # fills the cache: the run is on cached images
            before = workers_rss(server)
            log(f"[load] {count} requests, {concurrency} clients, workers {before} MiB after the warm-up ...")
            result = drive(server.base, payloads[WARMUP:], concurrency)
            after = workers_rss(server)
    growth = {pid: round(100 * (after[pid] - rss) / rss, 2) for pid, rss in before.items()
              if rss and after.get(pid) is not None}
    return {"concurrency": concurrency, "workers": workers, "warmup": {k: warm[k] for k in ("requests", "errors")},
            "rss_before_mb": before, "rss_after_mb": after, "rss_growth_pct": growth,
            "max_rss_growth_pct": max(growth.values()) if growth else None, **result}


def run(ctx: Context) -> dict[str, Any]:
    result = measure(ctx.workdir / "load", REQUESTS[ctx.mode.name], log=ctx.log)
    ok = result["errors"] == 0 and result["max_rss_growth_pct"] is not None and result["max_rss_growth_pct"] < 10
    result["headline"] = {
        "name": f"{result['requests']} cached clicks, {result['concurrency']} clients, gunicorn + Redis: errors",
        "value": result["errors"], "unit": "errors", "target": "0, RSS growth < 10 %", "met": ok,
        "absolute": f"p50/p95/p99 {result.get('p50_ms')}/{result.get('p95_ms')}/{result.get('p99_ms')} ms, "
                    f"RSS {result['max_rss_growth_pct']:+} %"}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="load test: cached interactive requests through gunicorn + Redis")
    parser.add_argument("--requests", type=int, default=REQUESTS["full"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers")
    parser.add_argument("--redis", default=REDIS_URL)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    import tempfile

    from .common import machine

    with tempfile.TemporaryDirectory(prefix="fastsam-load-") as tmp:
        result = measure(Path(tmp), args.requests, args.concurrency, args.redis, args.workers,
                         log=lambda m: print(m, file=sys.stderr))
    result["machine"] = machine()
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
