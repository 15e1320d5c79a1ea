"""Section — warm clicks under concurrency: 8 clients against one gunicorn worker (+ Redis).

The warm run's image, prompts and realistic LS bodies; after one cold request fills the cache,
``CLIENTS`` threads (one keep-alive session each) send the prompts as fast as they are answered.
Reported: clicks/s per worker process and client-side p50 / p95 / p99. The same load is run in
the same process against the base commit (``BENCH_BASE_REF``, default ``main``: its
``fastsam_backend`` extracted with ``git archive``), alternating the two three times (once in
quick mode) so drifting load on a shared machine hits both. Reported, not asserted (issue #16: within 10% of the base).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .common import REDIS_URL, Context, ratio, stats_ms
from .lsbody import IMAGE_URL, captured
from .servers import REPO, backend, redis_prefix, static_server, wait_loaded
from .warm import prepare

CLIENTS = 8
ROUNDS = {"quick": 1}  # per side; 3 in full mode
BASE_REF = os.environ.get("BENCH_BASE_REF", "main")


def base_checkout(workdir: Path, ref: str = BASE_REF) -> tuple[Path, str] | None:
    """``(folder holding the base commit's fastsam_backend, commit id)``, or None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"], check=True,
                                capture_output=True, text=True, timeout=30).stdout.strip()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "fastsam_backend"], check=True,
                                 capture_output=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    target = workdir / f"base-{commit[:10]}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target, commit


def _load(server_base: str, bodies: list[bytes], clients: int) -> dict[str, Any]:
    import requests

    headers = {"Content-Type": "application/json"}
    shares = [bodies[i::clients] for i in range(clients)]

    def client(share: list[bytes]) -> list[float]:
        times = []
        with requests.Session() as http:
            for body in share:
                started = time.perf_counter()
                http.post(f"{server_base}/predict", data=body, headers=headers, timeout=60).raise_for_status()
                times.append(time.perf_counter() - started)
        return times

    with ThreadPoolExecutor(max_workers=clients) as pool:
        started = time.perf_counter()
        latencies = [t for times in pool.map(client, shares) for t in times]
        wall = time.perf_counter() - started
    return {"clicks": len(latencies), "wall_s": round(wall, 3), "clicks_per_s": round(len(latencies) / wall, 1),
            "latency": stats_ms(latencies)}


@contextlib.contextmanager
def _served(ctx: Context, inputs: dict[str, Any], repo: Path, ls_base: str):
    import requests

    with redis_prefix() as (_client, prefix):
        env = {"FASTSAM_WEIGHTS": str(inputs["built"].path), "IMGSZ": str(ctx.mode.warm_imgsz),
               "REDIS_URL": REDIS_URL, "CACHE_PREFIX": prefix, "LABEL_STUDIO_URL": ls_base,
               "LABEL_STUDIO_API_KEY": "f" * 40, "WORKERS": "1", "THREADS": "4"}
        with backend(env, ctx.workdir, repo=repo) as server:
            wait_loaded(server)  # /predict would answer 503 "still loading" on a busy machine
            requests.post(f"{server.base}/setup", json=captured("/setup", interactive=False), timeout=30)
            first = requests.post(f"{server.base}/predict", data=inputs["bodies"][0],
                                  headers={"Content-Type": "application/json"}, timeout=300)
            if first.status_code != 200:  # cold: fills the cache
                raise RuntimeError(f"cold /predict answered {first.status_code}: {first.text[:300]}")
            yield server


def run(ctx: Context) -> dict[str, Any]:
    if not ctx.mode.throughput:
        return {"skipped": f"not run in {ctx.mode.name} mode"}
    inputs = prepare(ctx)
    root = ctx.workdir / "served-clicks"
    (root / IMAGE_URL.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (root / IMAGE_URL.lstrip("/")).write_bytes(inputs["png"])
    base = base_checkout(ctx.workdir)
    repos = {"head": REPO, **({"base": base[0]} if base else {})}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in repos}
    bodies = inputs["bodies"]
    ctx.log(f"  clicks: {CLIENTS} clients x {len(bodies)} prompts, head" + (f" vs base {base[1][:10]}" if base else ""))
    with static_server(root) as ls_base:
        for _round in range(ROUNDS.get(ctx.mode.name, 3)):  # alternate: drifting load hits both
            for name, repo in repos.items():
                with _served(ctx, inputs, repo, ls_base) as server:
                    _load(server.base, bodies[:2 * CLIENTS], CLIENTS)  # warm-up: connections, LRU
                    runs[name].append(_load(server.base, bodies, CLIENTS))
    best = {name: sorted(r, key=lambda x: x["clicks_per_s"])[len(r) // 2] for name, r in runs.items()}
    out: dict[str, Any] = {"clients": CLIENTS, "workers": 1, "threads": 4, "runs": runs, "median": best,
                           "base_commit": base[1] if base else None,
                           "note": "the median round (by clicks/s) of each; the 8 client threads run on the same cores"}
    head = best["head"]
    absolute = f"p50 {head['latency']['p50_ms']:.1f} / p99 {head['latency']['p99_ms']:.1f} ms"
    if "base" in best:
        out["head_over_base_clicks_per_s"] = ratio(head["clicks_per_s"], best["base"]["clicks_per_s"])
        absolute += (f"; base {base[1][:8]}: {best['base']['clicks_per_s']} clicks/s, p99 "
                     f"{best['base']['latency']['p99_ms']:.1f} ms (head/base {out['head_over_base_clicks_per_s']}x)")
    out["headline"] = {"name": f"warm clicks/s per worker, {CLIENTS} concurrent clients (HTTP + Redis)",
                       "value": head["clicks_per_s"], "unit": "clicks/s", "target": "report (base within 10%)",
                       "met": None, "absolute": absolute}
    return out
