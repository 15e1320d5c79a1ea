"""Section ``burst`` — peak RSS of the server under a burst of cold 12 MP images.

16 clients click at once on 16 different, uncached 4000x3000 JPEGs (one worker, 16 threads,
the trained fixture model at 640, embedded cache): with ``MAX_COLD_IMAGES=2`` (the default) at
most two are fetched, decoded and segmented at a time, the rest queue; with 16 all are held at
once. Reported per setting: the worker's peak RSS (``VmHWM``), the burst's wall time and the
statuses. (``tests/test_loading.py`` tests that the slots bound the concurrency.)
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fastsam_backend.quality.lsrequests import captured, keypoint
from fastsam_backend.quality.scenes import generate_scene

from .common import Context
from .load import FIXTURE
from .servers import backend, peak_rss_mb, static_server, wait_loaded

SIZES = {"quick": (16, (3000, 4000)), "full": (16, (3000, 4000))}  # images, (H, W)
SLOTS = (2, 16)


def _images(root, count: int, size: tuple[int, int]) -> list[str]:
    """``count`` JPEGs of one scene, each with other pixels (a cold image each); their URLs."""
    from PIL import Image

    folder = root / "data" / "upload" / "1"
    folder.mkdir(parents=True, exist_ok=True)
    base = generate_scene(1_000_201, (size[0] // 4, size[1] // 4)).image
    big = np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))  # a scene at 1/4 size, scaled up
    urls = []
    for i in range(count):
        img = big.copy()
        img[i, : i + 1] ^= 0xFF  # a few pixels differ: another digest, the same work
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, "JPEG", quality=90)
        (folder / f"burst-{i}.jpg").write_bytes(buffer.getvalue())
        urls.append(f"/data/upload/1/burst-{i}.jpg")
    return urls


def _burst(ctx: Context, urls: list[str], size: tuple[int, int], slots: int, ls_base: str) -> dict[str, Any]:
    import requests

    env = {"FASTSAM_WEIGHTS": str(FIXTURE), "IMGSZ": "640", "CONF": "0.1", "IOU": "0.7", "CLIP_ENABLED": "false",
           "DEFAULT_LABEL": "Banana", "LABEL_STUDIO_URL": ls_base, "LABEL_STUDIO_API_KEY": "f" * 40,
           "MAX_COLD_IMAGES": str(slots), "THREADS": str(len(urls)), "MAX_IMAGE_PIXELS": "20000000"}
    h, w = size

    def click(url: str) -> int:
        body = captured("/predict", interactive=True)
        body["tasks"][0]["data"]["image"] = url
        body["params"]["context"]["result"] = [keypoint(w // 2, h // 2, w, h)]
        return requests.post(f"{server.base}/predict", data=json.dumps(body), timeout=300,
                             headers={"Content-Type": "application/json"}).status_code

    with backend(env, ctx.workdir) as server:
        wait_loaded(server)
        (worker,) = server.worker_pids()
        idle = peak_rss_mb(worker)
        started = time.perf_counter()
        with ThreadPoolExecutor(len(urls)) as pool:
            statuses = list(pool.map(click, urls))
        wall = time.perf_counter() - started
        peak = peak_rss_mb(worker)
    ctx.log(f"[burst] MAX_COLD_IMAGES={slots}: peak RSS {peak} MiB (idle {idle}), {wall:.1f} s")
    return {"max_cold_images": slots, "peak_rss_mb": peak, "rss_before_burst_mb": idle, "wall_s": round(wall, 1),
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}}


def run(ctx: Context) -> dict[str, Any]:
    if ctx.mode.name not in SIZES:
        return {"skipped": "smoke mode: two servers and 12 MP images take a minute; quick mode measures it"}
    count, size = SIZES[ctx.mode.name]
    root = ctx.workdir / "burst"
    urls = _images(root, count, size)
    with static_server(root) as ls_base:
        runs = [_burst(ctx, urls, size, slots, ls_base) for slots in SLOTS]
    bounded, unbounded = runs
    return {"images": count, "image_size": f"{size[1]}x{size[0]}", "runs": runs,
            "headline": {"name": f"peak worker RSS, {count} cold {size[1]}x{size[0]} images at once",
                         "value": bounded["peak_rss_mb"], "unit": "MiB",
                         "target": f"< MAX_COLD_IMAGES={SLOTS[1]}'s",
                         "met": bounded["peak_rss_mb"] < unbounded["peak_rss_mb"],
                         "absolute": f"MAX_COLD_IMAGES={SLOTS[0]}: {bounded['peak_rss_mb']} MiB, "
                                     f"{SLOTS[1]}: {unbounded['peak_rss_mb']} MiB"}}
