"""End to end: `fastsam-backend serve` under gunicorn with real Redis, driven by the
requests Label Studio 1.23.2 actually sent (fastsam_backend/quality/ls-requests.json)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis
import requests
from label_studio_sdk.converter.brush import decode_rle as sdk_decode_rle

from fastsam_backend.quality.net import free_port
from fastsam_backend.quality.scenes import generate_scene
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ
from tests.helpers import captured, interior_point, keypoint, png_bytes

pytestmark = [pytest.mark.slow, pytest.mark.model]
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def redis_prefix():
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("Redis must run at 127.0.0.1:6379 for this test (.ci/run starts it)")
    prefix = f"fastsam-e2e-{uuid.uuid4().hex[:8]}:"
    yield prefix
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def start_server(env_overrides: dict, tmp_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTSAM_", "REDIS_", "LABEL_STUDIO"))}
    env.update({"PORT": str(port), "BIND_HOST": "127.0.0.1", "WORKERS": "2", "THREADS": "2",
                "LOG_LEVEL": "INFO", "FASTSAM_ALLOW_DOWNLOAD": "false", "MODEL_DIR": str(tmp_path)})
    env.update(env_overrides)
    log = open(tmp_path / f"server-{port}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "fastsam_backend", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    return proc, base
            except requests.RequestException:
                time.sleep(0.2)
            assert proc.poll() is None, (tmp_path / f"server-{port}.log").read_text()
        raise AssertionError("server did not come up in 60 s")
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def cache_hits(base: str) -> float:
    text = requests.get(f"{base}/metrics", timeout=5).text
    match = re.search(r'^fastsam_cache_lookups_total\{result="hit"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_captured_ls_session_against_gunicorn(fastsam_weights, image_server, redis_prefix, tmp_path):
    root, ls_base = image_server
    scene = generate_scene(1_000_011, (240, 320))
    (root / "data" / "upload" / "1").mkdir(parents=True, exist_ok=True)
    (root / "data" / "upload" / "1" / "fa0fbf60-a.png").write_bytes(png_bytes(scene.image))
    proc, base = start_server({
        "FASTSAM_WEIGHTS": str(fastsam_weights), "IMGSZ": str(FIXTURE_IMGSZ), "CONF": str(FIXTURE_CONF), "IOU": "0.7",
        "REDIS_URL": REDIS_URL, "CACHE_PREFIX": redis_prefix, "LABEL_STUDIO_URL": ls_base,
        "LABEL_STUDIO_API_KEY": "f" * 40, "DEFAULT_LABEL": "Banana",  # no CLIP here
    }, tmp_path)
    try:
        health = requests.get(f"{base}/health", timeout=10).json()
        assert health["status"] == "UP" and health["ready"] is True
        assert loaded_health(base)["state"] == "ready"
        setup = requests.post(f"{base}/setup", json=captured("/setup"), timeout=3)
        assert setup.status_code == 200 and setup.json()["model_version"]

        # the captured click, moved onto an object of the served image (same 320x240 size)
        body = captured("/predict", interactive=True)
        target = max(scene.objects, key=lambda o: o.mask.sum())
        x, y = interior_point(target.mask)
        body["params"]["context"]["result"] = [keypoint(x, y, 320, 240)]
        response = requests.post(f"{base}/predict", json=body, timeout=100)
        assert response.status_code == 200, response.text
        region = response.json()["results"][0]["result"][0]
        mask = sdk_decode_rle(region["value"]["rle"]).reshape(240, 320, 4)[:, :, 0] > 0
        assert mask[y, x]

        before = cache_hits(base)
        for _ in range(4):  # two workers: whichever answers, the masks come from Redis
            again = requests.post(f"{base}/predict", json=body, timeout=100)
            assert again.json()["results"][0]["result"][0]["value"]["rle"] == region["value"]["rle"]
        assert cache_hits(base) >= before + 4

        batch = requests.post(f"{base}/predict", json=captured("/predict", interactive=False), timeout=100)
        assert batch.status_code == 200 and len(batch.json()["results"]) == 1

        bad = requests.post(f"{base}/predict", data=b"{", headers={"Content-Type": "application/json"}, timeout=5)
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]
        assert requests.get(f"{base}/health", timeout=10).status_code == 200
    finally:
        stop_server(proc)


def loaded_health(base: str, wait_s: float = 60) -> dict:
    """/health once the worker's background load is over (it starts as the worker does)."""
    deadline = time.monotonic() + wait_s
    while True:
        health = requests.get(f"{base}/health", timeout=10).json()
        if health["state"] != "loading" or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def test_missing_weights_under_gunicorn(image_server, tmp_path):
    _, ls_base = image_server
    proc, base = start_server({"FASTSAM_WEIGHTS": "FastSAM-s.pt", "LABEL_STUDIO_URL": ls_base}, tmp_path)
    try:
        health = loaded_health(base)
        assert health["state"] == "error" and health["ready"] is False and "FastSAM-s.pt" in health["error"]
        response = requests.post(f"{base}/predict", json=captured("/predict", interactive=True), timeout=30)
        assert response.status_code == 503 and "FastSAM-s.pt" in response.json()["error"]
        assert requests.get(f"{base}/health", timeout=10).status_code == 200
    finally:
        stop_server(proc)
