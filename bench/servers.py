"""Processes the HTTP sections drive: the backend under gunicorn, a static image server, Redis keys.

Everything binds to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastsam_backend.quality.net import free_port

from .common import REDIS_URL

REPO = Path(__file__).resolve().parents[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    latency_s = 0.0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.latency_s:
            time.sleep(self.latency_s)  # a far image host (another region's object store)
        super().do_GET()


@contextlib.contextmanager
def static_server(root: Path, latency_s: float = 0.0) -> Iterator[str]:
    """Serve ``root`` at ``http://127.0.0.1:<port>`` (stands in for Label Studio's /data/upload),
    each response ``latency_s`` late."""
    handler_class = type("_Handler", (_QuietHandler,), {"latency_s": latency_s})
    handler = lambda *a, **kw: handler_class(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def redis_prefix(url: str = REDIS_URL) -> Iterator[tuple[object, str]]:
    """A private key prefix on Redis; every key under it is deleted afterwards."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
    client.ping()
    prefix = f"fastsam-bench-{uuid.uuid4().hex[:8]}:"
    try:
        yield client, prefix
    finally:
        for _ in range(100):  # bounded: each pass deletes up to 1,000 keys
            keys = list(client.scan_iter(f"{prefix}*", count=1000))[:1000]
            if not keys:
                break
            client.delete(*keys)
        client.close()


@dataclass
class Backend:
    """A running ``python -m fastsam_backend serve``."""

    proc: subprocess.Popen
    base: str
    log_path: Path

    def master_pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        """Gunicorn workers: the children of the master process."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                pids.append(int(entry.name))
        return sorted(pids)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_backend(env_overrides: dict[str, str], logdir: Path, timeout_s: float = 120, repo: Path = REPO) -> Backend:
    """Start the backend (the package in ``repo``) on a free loopback port and wait until /health answers."""
    import requests

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTSAM_", "REDIS_", "LABEL_STUDIO", "CACHE_", "PROMETHEUS_"))}
    env.update({"PORT": str(port), "BIND_HOST": "127.0.0.1", "WORKERS": "1", "THREADS": "4", "LOG_LEVEL": "WARNING",
                "FASTSAM_ALLOW_DOWNLOAD": "false", "MODEL_DIR": str(logdir), "YOLO_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))})
    env.update(env_overrides)
    log_path = logdir / f"backend-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fastsam_backend", "serve"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=str(repo))
    backend = Backend(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode}: {backend.log_tail()}")
        try:
            if requests.get(f"{backend.base}/health", timeout=5).status_code == 200:
                return backend
        except requests.RequestException:
            time.sleep(0.2)
    stop_backend(backend)
    raise RuntimeError(f"backend did not answer /health in {timeout_s:.0f} s: {backend.log_tail()}")


def stop_backend(backend: Backend) -> None:
    """SIGTERM the backend's process group (the one it was started in), SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(backend.proc.pid, signal.SIGTERM)
    try:
        backend.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(backend.proc.pid, signal.SIGKILL)
        backend.proc.wait(timeout=10)


def wait_loaded(backend: Backend, timeout_s: float = 120, streak: int = 4) -> dict:
    """/health once the background model load is over: ``streak`` answers in a row not
    ``loading`` (with several workers each answer comes from any of them)."""
    import requests

    deadline, seen, health = time.monotonic() + timeout_s, 0, {}
    while seen < streak:
        health = requests.get(f"{backend.base}/health", timeout=10).json()
        seen = seen + 1 if health.get("state") != "loading" else 0
        if time.monotonic() > deadline:
            raise RuntimeError(f"the models were still loading after {timeout_s:.0f} s: {backend.log_tail()}")
        if seen < streak:
            time.sleep(0.1)
    return health


@contextlib.contextmanager
def backend(env_overrides: dict[str, str], logdir: Path, repo: Path = REPO) -> Iterator[Backend]:
    running = start_backend(env_overrides, logdir, repo=repo)
    try:
        yield running
    finally:
        stop_backend(running)


def peak_rss_mb(pid: int) -> float | None:
    """``VmHWM`` (peak resident set) of ``pid`` in MiB, from /proc."""
    return status_mb(pid, "VmHWM")


def status_mb(pid: int, field: str) -> float | None:
    """A kB field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in MiB; None when ``pid`` is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None
