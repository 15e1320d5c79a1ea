"""One worker's warm throughput with and without batching (issue #14 item 4; report only).

``python -m bench.gpu_batch [--images 64] [--batch 8] [--imgsz 1024] [--out FILE]``: a random-weight
FastSAM-s calibrated to ~100 instances (as in ``cold``), ``--images`` generated scenes served over
HTTP as Label Studio serves them, and the worker's own batch step (``batching.warm_batch``, the
code a worker runs) over them, once one image per pass and once ``--batch`` per pass, each on a
fresh embedded cache. Prints images/s and the split per image: load (download + decode), the
network pass (ultralytics' preprocess / inference / postprocess inside it) and the cache write.
Made for a lent GPU (``scripts/gpu_run.sh``); on a CPU the batched run is one pass per image
(``Segmenter.batches``), so both rows measure the same work.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fastsam_backend.quality.lsrequests import png_bytes

from .cold import ultralytics_speed
from .common import CONF, IOU, MAX_DET, MODES, Context, machine, model_for, scene_image
from .servers import static_server

FIRST_SEED = 1_000_900


def _run(built, imgsz: int, base: str, warmup: list[str], urls: list[str], batch: int) -> dict[str, Any]:
    from fastsam_backend.jobs.batching import warm_batch
    from fastsam_backend.service.orchestrator import build_service
    from fastsam_backend.settings import load_settings

    settings = load_settings(fastsam_weights=str(built.path), model_dir=str(built.path.parent), imgsz=imgsz,
                             conf=CONF, iou=IOU, max_det=MAX_DET, allow_download=False, clip_enabled=False,
                             redis_url=None, label_studio_url=base)  # a fresh embedded cache per run
    service = build_service(settings)
    service.segmenter.load()
    warm_batch(service, warmup[:batch], batch)  # warm-up pass (CUDA kernels, allocator)
    todo = urls
    split = {"load": 0.0, "network": 0.0, "write": 0.0}
    inside: dict[str, float] = {}
    passes, started = 0, time.perf_counter()
    for i in range(0, len(todo), batch):
        report = warm_batch(service, todo[i : i + batch], batch)
        passes += report.passes
        for stage, seconds in report.seconds.items():
            split[stage] += seconds
        for phase, ms in ultralytics_speed(service.segmenter).items():  # per image, of the last pass
            inside[phase] = inside.get(phase, 0.0) + ms * report.computed
    wall = time.perf_counter() - started
    n = len(todo)
    return {"batch": batch, "images": n, "batch_calls": passes, "device": str(service.segmenter._device),
            "batched_passes": service.segmenter.batches, "images_per_s": round(n / wall, 2),
            "per_image_ms": {k: round(1000 * v / n, 1) for k, v in split.items()},
            "network_inside_per_image_ms": {k: round(v / n, 1) for k, v in inside.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--imgsz", type=int, default=1024)
    parser.add_argument("--side", type=int, default=1024, help="the served images' side (square scenes)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastsam-gpu-batch-") as tmp:
        workdir = Path(tmp)
        ctx = Context(MODES["quick"], workdir, log=lambda line: None)
        ctx.shared["calibration_image"] = scene_image(FIRST_SEED - 1, args.side)
        built = model_for(ctx, "s", args.imgsz)
        root = workdir / "served"
        (root / "data" / "upload" / "9").mkdir(parents=True)
        urls = []
        for i in range(args.batch + args.images):  # a warm-up batch, then the timed images (each run: a fresh cache)
            name = f"data/upload/9/g{FIRST_SEED + i}.png"
            (root / name).write_bytes(png_bytes(scene_image(FIRST_SEED + i, args.side)))
            urls.append("/" + name)
        with static_server(root) as base:
            warmup, timed = urls[: args.batch], urls[args.batch :]
            one = _run(built, args.imgsz, base, warmup, timed, 1)
            many = _run(built, args.imgsz, base, warmup, timed, args.batch)
    out = {"machine": machine(), "imgsz": args.imgsz, "side": args.side, "one_per_pass": one, "batched": many,
           "speedup": round(many["images_per_s"] / one["images_per_s"], 2) if one["images_per_s"] else None}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
