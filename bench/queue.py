"""Section 7 — the job queues: warm jobs on ``fastsam-backend worker`` processes.

- per-image wall time of a warm job in a worker (RQ's started → ended: download, decode, the
  everything pass, cache write) against the bare ``Segmenter.segment`` on the same single core
  with one torch thread (target ≤ 1.1×);
- images/min of one worker pinned to one core against two workers pinned to one core each
  (scaling efficiency = two / (2 × one), target ≥ 0.9);
- enqueue → cache-filled: from the first enqueue until every image's job has finished;
- one worker on images from a far host (``FAR_LATENCY_S`` per response) with ``WORKER_PREFETCH``
  on and off: images/min, i.e. how much of the download the next job's prefetch hides.

A private ``redis-server`` on a free port; images are generated scenes served over HTTP as Label
Studio would serve them; random-weight FastSAM-s calibrated to ~100 instances (as in ``cold``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fastsam_backend.quality.lsrequests import png_bytes
from fastsam_backend.quality.net import free_port

from .common import Context, calibration_image, decode_png, model_for, segmenter_for, stats_ms
from .servers import REPO, static_server

FIRST_SEED = 1_000_700
IMGSZ = 640
TARGET_OVERHEAD, TARGET_SCALING = 1.1, 0.9
FAR_LATENCY_S = 0.3


def _redis(port: int) -> subprocess.Popen:
    import redis

    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            if redis.Redis(port=port, socket_connect_timeout=0.5).ping():
                return proc
        except redis.RedisError:
            time.sleep(0.2)  # the poller shares the cores the pinned workers run on
    proc.kill()
    raise RuntimeError("redis-server did not start")


def _worker(env: dict[str, str], prefix: str, core: int, log: Path, **extra: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fastsam_backend", "worker", "--queues", "warm"],
                                env={**env, "QUEUE_PREFIX": prefix, "CACHE_PREFIX": prefix, **extra}, cwd=REPO,
                                stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=lambda: os.sched_setaffinity(0, {core}))


def _bare_forward(ctx: Context, built, pngs: list[bytes], core: int) -> list[float]:
    """``Segmenter.segment`` here, pinned to ``core`` with one torch thread, as the workers run."""
    import torch

    threads, affinity = torch.get_num_threads(), os.sched_getaffinity(0)
    seg = segmenter_for(built, IMGSZ, device="cpu")
    seg.load()
    try:
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
        seg.segment(decode_png(pngs[0]))  # warm-up, as the workers' first job is not timed either
        times = []
        for png in pngs[1:]:
            image = decode_png(png)
            started = time.perf_counter()
            seg.segment(image)
            times.append(time.perf_counter() - started)
        return times
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, affinity)


def _run(queues, service, urls: list[str]) -> tuple[float, list[float]]:
    """Enqueue warm jobs for ``urls``; (enqueue → all finished seconds, per-job seconds)."""
    from fastsam_backend.jobs.enqueue import enqueue_warm

    started = time.perf_counter()
    report = enqueue_warm(queues, service, urls)
    while True:
        states = queues.states(report.job_ids)
        if all(s.status in ("finished", "failed") for s in states):
            break
        if time.perf_counter() - started > 600:
            raise TimeoutError("warm jobs did not finish in 600 s")
        time.sleep(0.2)  # the poller shares the cores the pinned workers run on
    wall = time.perf_counter() - started
    failed = [s for s in states if s.status == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} warm jobs failed: {failed[0].reason}")
    return wall, [s.result["seconds"] for s in states]


def run(ctx: Context) -> dict[str, Any]:
    if ctx.mode.name == "smoke":
        return {"skipped": "not run in smoke mode (starts three worker processes)"}
    if shutil.which("redis-server") is None:
        return {"skipped": "redis-server is not installed"}
    cores = sorted(os.sched_getaffinity(0))
    n = {"quick": 6, "full": 16}[ctx.mode.name]
    built = model_for(ctx, "s", IMGSZ)
    calibration_image(ctx)
    root = ctx.workdir / "queue-served"
    (root / "data" / "upload" / "9").mkdir(parents=True, exist_ok=True)
    from .common import scene_image

    def image(i: int) -> str:
        name = f"data/upload/9/q{FIRST_SEED + i}.png"
        (root / name).write_bytes(png_bytes(scene_image(FIRST_SEED + i, IMGSZ)))
        return "/" + name

    # per setting: one warm-up job per worker (its first forward pass is slower), then n timed images
    urls = {"one-": [image(i) for i in range(1 + n)], "two-": [image(100 + i) for i in range(2 + n)],
            "far-on-": [image(200 + i) for i in range(1 + n)], "far-off-": [image(300 + i) for i in range(1 + n)]}
    bare = _bare_forward(ctx, built, [(root / u[1:]).read_bytes() for u in urls["one-"][:4]], cores[0])

    from fastsam_backend.jobs.queues import JobQueues, QueueConfig
    from fastsam_backend.service.orchestrator import build_service
    from fastsam_backend.settings import load_settings

    port = free_port()
    redis_proc = _redis(port)
    procs: list[subprocess.Popen] = []
    try:
        with static_server(root) as ls_base, static_server(root, FAR_LATENCY_S) as far_base:
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("FASTSAM_", "REDIS_", "LABEL_STUDIO", "CACHE_", "QUEUE_", "JOB_"))}
            env.update({"FASTSAM_WEIGHTS": str(built.path), "IMGSZ": str(IMGSZ), "FASTSAM_ALLOW_DOWNLOAD": "false",
                        "MODEL_DIR": str(built.path.parent), "REDIS_URL": f"redis://127.0.0.1:{port}/0",
                        "LABEL_STUDIO_URL": ls_base, "LABEL_STUDIO_API_KEY": "f" * 40, "CLIP_ENABLED": "false",
                        "TORCH_THREADS": "1", "YOLO_OFFLINE": "1", "LOG_LEVEL": "WARNING", "DEVICE": "cpu",
                        "PYTHONPATH": str(REPO)})
            pinned = {"one-": [cores[0]], **({"two-": [cores[0], cores[1]]} if len(cores) >= 2 else {}),
                      "far-on-": [cores[0]], "far-off-": [cores[0]]}
            extra = {"far-on-": {"LABEL_STUDIO_URL": far_base},
                     "far-off-": {"LABEL_STUDIO_URL": far_base, "WORKER_PREFETCH": "false"}}
            procs = [_worker(env, prefix, core, ctx.workdir / f"queue-{prefix}{core}.log", **extra.get(prefix, {}))
                     for prefix, on in pinned.items() for core in on]
            setups = {}
            for prefix in pinned:
                base = far_base if prefix.startswith("far-") else ls_base
                settings = load_settings(fastsam_weights=str(built.path), imgsz=IMGSZ, model_dir=built.path.parent,
                                         redis_url=env["REDIS_URL"], queue_prefix=prefix, cache_prefix=prefix,
                                         clip_enabled=False, label_studio_url=base)
                setups[prefix] = (JobQueues(QueueConfig.from_settings(settings)), build_service(settings))
            connection = setups["one-"][0].connection
            deadline = time.monotonic() + 180
            while connection.scard("rq:workers") < len(procs):  # registered = models loaded
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("workers did not start: "
                                       + (ctx.workdir / f"queue-one-{cores[0]}.log").read_text()[-800:])
                time.sleep(0.2)
            out: dict[str, Any] = {"cores": cores, "images": n, "imgsz": IMGSZ, "model": built.as_dict(),
                                   "bare_forward": stats_ms(bare)}
            for prefix, on in pinned.items():
                queues, service = setups[prefix]
                _run(queues, service, urls[prefix][:len(on)])  # warm-up
                wall, per_job = _run(queues, service, urls[prefix][len(on):])
                out[prefix.rstrip("-").replace("-", "_")] = {"workers": len(on), "enqueue_to_cached_s": round(wall, 2),
                                           "images_per_minute": round(60 * n / wall, 2), "job": stats_ms(per_job)}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis_proc.kill()
        redis_proc.wait(5)
    overhead = out["one"]["job"]["p50_ms"] / out["bare_forward"]["p50_ms"]
    out["job_over_bare_forward"] = round(overhead, 3)
    if "two" in out:
        out["scaling_efficiency"] = round(out["two"]["images_per_minute"] / (2 * out["one"]["images_per_minute"]), 3)
    out["far_host"] = {"latency_s": FAR_LATENCY_S, "prefetch_gain": round(
        out["far_on"]["images_per_minute"] / out["far_off"]["images_per_minute"], 3)}
    out["headline"] = {
        "name": f"warm job in a worker vs bare forward, 1 core (FastSAM-s@{IMGSZ})", "value": round(overhead, 2),
        "unit": "x", "target": f"<= {TARGET_OVERHEAD}", "met": overhead <= TARGET_OVERHEAD,
        "absolute": f"job p50 {out['one']['job']['p50_ms']:.0f} ms vs segment {out['bare_forward']['p50_ms']:.0f} ms; "
                    f"1 worker {out['one']['images_per_minute']} img/min"
                    + (f", 2 workers {out['two']['images_per_minute']} img/min = efficiency "
                       f"{out['scaling_efficiency']} (target >= {TARGET_SCALING}); enqueue->cached {n} images "
                       f"{out['two']['enqueue_to_cached_s']} s" if "two" in out else "")
                    + f"; far host ({FAR_LATENCY_S:g} s/image): prefetch {out['far_on']['images_per_minute']} vs "
                      f"{out['far_off']['images_per_minute']} img/min without"}
    return out
