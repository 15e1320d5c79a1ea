"""Shared fixtures: the trained FastSAM fixture model, scenes, a local image server."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = FIXTURES / "models"
FASTSAM_FIXTURE = MODELS / "fastsam-shapes.pt"
# Inference settings for the fixture: its last stage trained at 640 (scripts/train_fastsam_fixture.py), conf 0.1.
FIXTURE_IMGSZ = 640
FIXTURE_CONF = 0.1
# Every test server binds 127.0.0.1 (any port): allowed explicitly, the policy stays on.
TEST_OUTBOUND_ALLOW = "127.0.0.1"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def image_server(tmp_path_factory):
    """Serves a temp folder at http://127.0.0.1:<port>/ (the 'Label Studio' of the tests; settings from
    ``make_settings`` allow 127.0.0.1 in OUTBOUND_ALLOW, so it is reachable under any URL form)."""
    root = tmp_path_factory.mktemp("served")
    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def fastsam_weights() -> Path:
    """The trained FastSAM-architecture fixture (YOLOv8n-seg, one class, trained on scenes)."""
    import os

    path = Path(os.environ.get("FASTSAM_TEST_WEIGHTS", FASTSAM_FIXTURE))
    assert path.is_file(), f"{path} missing: run scripts/train_fastsam_fixture.py (see its docstring)"
    return path


@pytest.fixture(scope="session")
def make_settings(fastsam_weights, tmp_path_factory):
    """Settings for tests: the fixture model, embedded cache, no downloads."""
    from fastsam_backend.settings import Settings

    model_dir = tmp_path_factory.mktemp("models")

    def make(**overrides):
        # the test servers listen on 127.0.0.1, which the outbound policy refuses unless allowed
        base = dict(fastsam_weights=str(fastsam_weights), model_dir=model_dir, imgsz=FIXTURE_IMGSZ,
                    conf=FIXTURE_CONF, iou=0.7, allow_download=False, redis_url=None,
                    load_on_start=False, outbound_allow=TEST_OUTBOUND_ALLOW,
                    fastsam_runtime="torch")  # the ONNX Runtime default has its own tests (test_runtime_auto.py)
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture(autouse=True)
def _no_torch_in_the_fast_lane(request):
    """The fast lane (``-m "not model …"``, ``make test-fast``) must not import torch: a test that
    does belongs to the ``model`` marker. Checked after each test (so also in each xdist worker):
    the first test after which torch is loaded fails, naming the marker."""
    import sys

    yield
    if "not model" in (request.config.getoption("markexpr") or "") and "torch" in sys.modules:
        pytest.fail("FAST LANE: torch was imported; mark the test that loads a model with @pytest.mark.model",
                    pytrace=False)


def _whole_module_marked(path: Path, marker: str) -> bool:
    """Whether the test module marks all its tests ``marker`` (``pytestmark = ... pytest.mark.<marker>``)."""
    return any(line.startswith("pytestmark") and f"pytest.mark.{marker}" in line
               for line in path.read_text().splitlines())


def pytest_ignore_collect(collection_path, config):
    """The fast lane (``-m "not model and not real_ls and not slow"``) does not even import the modules
    it would deselect whole: tests/real_ls, and those marked ``model`` (some import torch at module
    level) or ``slow`` as a whole."""
    expr = config.getoption("markexpr") or ""
    if "not real_ls" in expr and "real_ls" in collection_path.parts:
        return True
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    negated = [marker for marker in ("model", "slow") if f"not {marker}" in expr]
    return True if any(_whole_module_marked(collection_path, marker) for marker in negated) else None


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Tests must reach nothing but 127.0.0.1/::1: image downloads that would connect elsewhere,
    or ask DNS about any name but localhost, fail the test instead (the policy should have
    refused them before; this is the net under it)."""
    import ipaddress

    from fastsam_backend import outbound
    from fastsam_backend.images import download

    real_connect, real_resolve = download._connect, outbound.system_resolve

    def connect(address, port, timeout):
        assert ipaddress.ip_address(address).is_loopback, f"a test tried to connect to {address}:{port}"
        return real_connect(address, port, timeout)

    def resolve(host, *args, **kwargs):
        assert host == "localhost", f"a test asked DNS about {host!r}"
        return real_resolve(host, *args, **kwargs)

    monkeypatch.setattr(download, "_connect", connect)
    monkeypatch.setattr(outbound, "system_resolve", resolve)


class OwnRedis:
    """A throwaway ``redis-server`` on a free 127.0.0.1 port (no RDB, no AOF), for tests that kill
    and restart it; ``extra`` are more server flags, ``password`` turns on ``requirepass``."""

    def __init__(self, *extra: str, password: str | None = None) -> None:
        from fastsam_backend.quality.net import free_port

        self.port, self.extra, self.password = free_port(), extra, password
        self.proc = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def raw(self, **kwargs):
        import redis

        return redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1, **kwargs)

    def start(self) -> None:
        import subprocess
        import time

        import redis

        auth = ("--requirepass", self.password) if self.password else ()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", *auth, *self.extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while True:
            try:
                if self.raw().ping():
                    return
            except (redis.RedisError, OSError):
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def own_redis(request):
    """A private redis-server; flags through ``@pytest.mark.parametrize("own_redis", [...], indirect=True)``."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis(*getattr(request, "param", ()))
    server.start()
    yield server
    server.kill()
