"""Faults of the real server (`fastsam-backend serve`, gunicorn): a checkpoint that cannot be
loaded, and a worker process SIGKILLed in the middle of a request.

The server is started with bench/servers.py (the helper the benchmarks use too)."""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from bench.servers import Backend, backend, wait_loaded
from fastsam_backend.quality.scenes import generate_scene
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ
from tests.helpers import captured, interior_point, keypoint, png_bytes

pytestmark = [pytest.mark.slow, pytest.mark.model]
SIZE = (240, 320)  # (H, W) of the served scene


class ImageHost:
    """Serves one PNG at ``/data/upload/1/<name>.png``; ``stall`` holds ``/data/upload/1/stall.png``
    until released; counts the requests it got."""

    def __init__(self, png: bytes) -> None:
        self.png, self.hits, self.stalled, self.release = png, 0, threading.Event(), threading.Event()
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.hits += 1
                if self.path.endswith("/stall.png"):
                    host.stalled.set()
                    host.release.wait(60)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(host.png)))
                self.end_headers()
                self.wfile.write(host.png)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scene():
    return generate_scene(1_000_013, SIZE)


@pytest.fixture
def host(scene):
    served = ImageHost(png_bytes(scene.image))
    yield served
    served.close()


def click_body(scene, image: str) -> dict:
    body = captured("/predict", interactive=True)
    body["tasks"][0]["data"]["image"] = f"/data/upload/1/{image}"
    x, y = interior_point(max(scene.objects, key=lambda o: o.mask.sum()).mask)
    body["params"]["context"]["result"] = [keypoint(x, y, SIZE[1], SIZE[0])]
    return body


def server_env(host: ImageHost, weights: Path, **extra: str) -> dict[str, str]:
    return {"FASTSAM_WEIGHTS": str(weights), "IMGSZ": str(FIXTURE_IMGSZ), "CONF": str(FIXTURE_CONF), "IOU": "0.7",
            "LABEL_STUDIO_URL": host.base, "LABEL_STUDIO_API_KEY": "f" * 40, "DEFAULT_LABEL": "Banana",
            "CLIP_ENABLED": "false", "LOG_LEVEL": "INFO", **extra}


# --- a checkpoint that cannot be loaded ---------------------------------------------------------------------------

def test_a_corrupt_checkpoint_is_a_503_with_the_reason_and_the_worker_stays_up(host, scene, tmp_path):
    weights = tmp_path / "corrupt.pt"
    weights.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 100)
    with backend(server_env(host, weights), tmp_path) as server:
        health = wait_loaded(server)
        assert health["state"] == "error" and health["ready"] is False and health["status"] == "UP"
        assert "could not be loaded" in health["error"] and "corrupt.pt" in health["error"]
        workers = server.worker_pids()
        assert len(workers) == 1

        for _ in range(3):
            response = requests.post(f"{server.base}/predict", json=click_body(scene, "a.png"), timeout=30)
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["status"] == 503 and "could not be loaded" in body["error"] and "corrupt.pt" in body["error"]
            assert "Traceback" not in response.text and body["request_id"]
        assert host.hits == 0, "the image was fetched although the model cannot segment it"

        time.sleep(2)  # a crash loop would have replaced the worker by now (it loads in ~1 s)
        assert server.proc.poll() is None and server.worker_pids() == workers
        assert requests.get(f"{server.base}/health", timeout=10).json()["state"] == "error"
        assert server.log_tail(20_000).count("Booting worker") == 1


# --- a worker SIGKILLed during a request -------------------------------------------------------------------------

def serving_worker(server: Backend, remote_port: int) -> int | None:
    """The worker holding a TCP connection to ``127.0.0.1:remote_port`` (the image host), from /proc."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == remote_port and fields[3] == "01":  # ESTABLISHED
            inodes.add(f"socket:[{fields[9]}]")
    for pid in server.worker_pids():
        try:
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if inodes & set(fds):
            return pid
    return None


def masks_of(response: requests.Response) -> list[list[int]]:
    """The RLEs of a /predict answer (region ids are new in every answer)."""
    return [region["value"]["rle"] for region in response.json()["results"][0]["result"]]


def wait_gone(pid: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, f"worker {pid} survived SIGKILL"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_worker_killed_mid_request_is_replaced_and_other_requests_are_unaffected(
        host, scene, fastsam_weights, own_redis, tmp_path):  # fmt: skip
    env = server_env(host, fastsam_weights, WORKERS="2", THREADS="4", REDIS_URL=own_redis.url)
    with backend(env, tmp_path) as server:
        wait_loaded(server)
        cached = click_body(scene, "a.png")
        first = requests.post(f"{server.base}/predict", json=cached, timeout=60)
        assert first.status_code == 200, first.text
        answer = masks_of(first)
        assert answer, "the click found no mask"

        def ask(body: dict) -> tuple[int, object]:
            response = requests.post(f"{server.base}/predict", json=body, timeout=60)
            return response.status_code, masks_of(response) if response.ok else response.text

        with ThreadPoolExecutor(8) as pool:
            doomed = pool.submit(requests.post, f"{server.base}/predict", json=click_body(scene, "stall.png"),
                                 timeout=60)
            assert host.stalled.wait(30), "the stalled download never started"
            victim = serving_worker(server, host.port)
            assert victim is not None
            before = server.worker_pids()
            # concurrent with the stalled request, on both workers (the victim has 3 threads free)
            during = [f.result() for f in [pool.submit(ask, cached) for _ in range(16)]]
            os.kill(victim, signal.SIGKILL)
            wait_gone(victim)
            with pytest.raises(requests.ConnectionError):
                doomed.result(timeout=30)
            # while gunicorn boots the replacement, the other worker answers
            meanwhile = [f.result() for f in [pool.submit(ask, cached) for _ in range(16)]]
        assert during == meanwhile == [(200, answer)] * 16

        deadline = time.monotonic() + 60
        while len(workers := server.worker_pids()) < 2 or victim in workers:
            assert time.monotonic() < deadline, f"gunicorn did not replace worker {victim}: {server.log_tail()}"
            time.sleep(0.1)
        replacement = (set(workers) - set(before)).pop()
        assert server.proc.poll() is None
        wait_loaded(server)
        with ThreadPoolExecutor(4) as pool:
            later = list(pool.map(ask, [cached] * 16))
        assert later == [(200, answer)] * 16
        assert replacement in server.worker_pids()
