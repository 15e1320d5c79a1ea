"""Processes and API plumbing for the real-Label-Studio tests: LS, our backend, the API calls LS's UI makes.

``LabelStudio.start`` runs Label Studio from ``.venv-ls`` (``scripts/install_test_env.sh``) on a free
loopback port with SQLite in a temp folder, logs in through ``/user/login/`` and creates a personal
access token (``POST /api/token/`` with the session and its CSRF token); ``LSApi`` sends it as LS
1.23 wants (exchanged for a ``Bearer`` access token, renewed on a 401). ``Backend`` runs this tree's
``python -m fastsam_backend serve`` with the fixture models.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from fastsam_backend.quality.net import free_port

ROOT = Path(__file__).resolve().parents[2]
LS_VERSION = "1.23.2"
LS_EXE = ROOT / ".venv-ls" / "bin" / "label-studio"
MODELS = ROOT / "tests" / "fixtures" / "models"
README = ROOT / "README.md"
CONFIG_MARKER = "<!-- label-config: tested by tests/real_ls -->"


def unavailable(reason: str) -> None:
    """Skip with the reason; with ``REQUIRE_LS=1`` (CI) fail instead."""
    if os.environ.get("REQUIRE_LS") == "1":
        pytest.fail(f"REQUIRE_LS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def readme_label_config() -> str:
    """The fenced ```xml block right after the README's label-config marker."""
    text = README.read_text()
    at = text.find(CONFIG_MARKER)
    assert at >= 0, f"README.md lost the line {CONFIG_MARKER!r}"
    found = re.compile(r"```xml\n(.*?)```", re.S).search(text, at)
    assert found, "no ```xml block after the README's label-config marker"
    lines = found.group(1).splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines).strip()


def tag_names(config: str) -> dict[str, str]:
    """``{"brushlabels": name, "keypointlabels": name, "rectanglelabels": name, "textarea": name}``: the
    first tag of each kind (the README's ``box``, not the exemplar tool ``similar`` after it)."""
    names: dict[str, str] = {}
    for el in ET.fromstring(config).iter():
        if el.tag.lower() in {"brushlabels", "keypointlabels", "rectanglelabels", "textarea"}:
            names.setdefault(el.tag.lower(), el.get("name", ""))
    return names


def image_bytes(image: np.ndarray, fmt: str = "PNG", exif: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {}
    if exif is not None:
        kwargs["exif"] = exif
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def decode_brush(region: dict) -> np.ndarray:
    """A brushlabels region's mask, ``(original_height, original_width)`` bool (SDK decoder)."""
    from label_studio_sdk.converter.brush import decode_rle

    h, w = region["original_height"], region["original_width"]
    flat = np.asarray(decode_rle(region["value"]["rle"]), np.uint8)
    assert flat.size == h * w * 4, f"RLE decodes to {flat.size} values, expected {h}x{w}x4"
    return flat.reshape(h, w, 4)[:, :, 0] > 0


class Proc:
    """A child in its own process group, logging to ``log``; ``stop()`` kills the group, bounded."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.name, self.log = name, log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 15) -> None:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self._out.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_http(self, url: str, timeout_s: float, ok: Callable[[requests.Response], bool] | None = None) -> None:
        ok = ok or (lambda r: r.status_code == 200)
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                r = requests.get(url, timeout=5)
                if ok(r):
                    return
                last = f"HTTP {r.status_code}"
            except requests.RequestException as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s (last: {last}):\n{self.tail()}")


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(poll_s)


class WebhookRelay:
    """Receives Label Studio's webhooks and forwards each to ``target``; keeps
    ``(payload, target's status, target's JSON)`` per call in ``exchanges``."""

    def __init__(self, target: str) -> None:
        self.target, self.exchanges = target, []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                r = requests.post(relay.target, json=payload, timeout=60)
                relay.exchanges.append((payload, r.status_code, r.json()))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LSApi:
    """Label Studio's REST API with a personal access token (refresh JWT → Bearer access JWT)."""

    def __init__(self, url: str, pat: str) -> None:
        self.url, self.pat = url, pat
        self.http = requests.Session()
        self._refresh()

    def _refresh(self) -> None:
        r = requests.post(f"{self.url}/api/token/refresh", json={"refresh": self.pat}, timeout=30)
        r.raise_for_status()
        self.http.headers["Authorization"] = f"Bearer {r.json()['access']}"

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 120)
        r = self.http.request(method, self.url + path, **kw)
        if r.status_code == 401:  # the access token lives 5 minutes
            self._refresh()
            r = self.http.request(method, self.url + path, **kw)
        return r

    def json(self, method: str, path: str, expect: int | tuple[int, ...] = (200, 201), **kw: Any) -> Any:
        r = self.request(method, path, **kw)
        expected = (expect,) if isinstance(expect, int) else expect
        assert r.status_code in expected, f"{method} {path}: HTTP {r.status_code} {r.text[:800]}"
        return r.json() if r.content else None

    # -- the steps a user takes in the UI
    def create_project(self, title: str, label_config: str) -> int:
        return self.json("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]

    def tasks(self, project: int) -> list[dict]:
        listed = self.json("GET", "/api/tasks", params={"project": project, "page_size": 1000})
        return listed["tasks"] if isinstance(listed, dict) else listed

    def upload(self, project: int, files: dict[str, bytes]) -> dict[str, dict]:
        """Upload image files (as the Data Manager's Import does); ``{file name: task}``."""
        mime = {".png": "image/png", ".jpg": "image/jpeg"}
        body = {f"file{i}": (name, data, mime[Path(name).suffix]) for i, (name, data) in enumerate(files.items())}
        self.json("POST", f"/api/projects/{project}/import", files=body)

        def by_name() -> dict[str, dict] | None:
            tasks = self.tasks(project)
            found = {name: t for name in files for t in tasks if t["data"]["image"].endswith("-" + name)}
            return found if len(found) == len(files) else None

        return wait_until(by_name, 60, f"tasks of {sorted(files)}")

    def connect_ml(self, project: int, url: str, title: str = "fastsam") -> dict:
        """Settings → Model → Connect Model, with Interactive preannotations on."""
        return self.json("POST", "/api/ml", json={"url": url, "project": project, "is_interactive": True,
                                                   "title": title})

    def interactive(self, ml_id: int, task_id: int, regions: list[dict]) -> dict:
        """What the labeling UI posts after a smart-tool region is drawn; LS's answer body."""
        return self.json("POST", f"/api/ml/{ml_id}/interactive-annotating",
                         json={"task": task_id, "context": {"result": regions}}, timeout=180)

    def retrieve_predictions(self, project: int) -> None:
        """Data Manager → select all tasks → Actions → Retrieve Predictions."""
        self.json("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                  json={"selectedItems": {"all": True, "excluded": []}}, timeout=300)

    def predictions(self, task_id: int) -> list[dict]:
        return self.json("GET", "/api/predictions", params={"task": task_id})


class LabelStudio:
    """One Label Studio server; ``start`` blocks until it answers and a token exists."""

    def __init__(self, proc: Proc, url: str, user: str, password: str) -> None:
        self.proc, self.url, self.user, self.password = proc, url, user, password
        self.pat = self._create_token()
        self.api = LSApi(url, self.pat)

    @classmethod
    def start(cls, tmp: Path, timeout_s: float = 600) -> LabelStudio:
        port, user, password = free_port(), "tester@example.com", secrets.token_hex(12)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))}
        env.update(LABEL_STUDIO_BASE_DATA_DIR=str(tmp / "ls-data"), ML_BLOCK_LOCAL_IP="false",
                   SSRF_PROTECTION_ENABLED="false", LATEST_VERSION_CHECK="false", COLLECT_ANALYTICS="false",
                   SENTRY_DSN="", FRONTEND_SENTRY_DSN="")
        cmd = [str(LS_EXE), "start", "--port", str(port), "--internal-host", "127.0.0.1", "--no-browser",
               f"--username={user}", f"--password={password}"]
        proc = Proc("label-studio", cmd, env, tmp / "label-studio.log", tmp)
        url = f"http://127.0.0.1:{port}"
        try:
            proc.wait_http(f"{url}/health", timeout_s)
            ls = cls(proc, url, user, password)
        except BaseException:
            proc.stop()
            raise
        ls._spawn = (cmd, env, tmp)
        return ls

    def restart(self, down_s: float = 0.0, timeout_s: float = 600) -> None:
        """Stopped (SIGTERM), ``down_s`` later started again on the same port and data; blocks until
        it answers. Tokens and projects survive (its database is on disk)."""
        cmd, env, tmp = self._spawn
        self.proc.stop()
        time.sleep(down_s)
        self.proc = Proc("label-studio", cmd, env, tmp / "label-studio.log", tmp)
        self.proc.wait_http(f"{self.url}/health", timeout_s)

    def login(self) -> requests.Session:
        """A browser-like session: the login form (fields ``email``, ``password``) with its CSRF token."""
        s = requests.Session()
        s.get(f"{self.url}/user/login/", timeout=60).raise_for_status()
        r = s.post(f"{self.url}/user/login/", allow_redirects=False, timeout=60,
                   data={"email": self.user, "password": self.password,
                         "csrfmiddlewaretoken": s.cookies["csrftoken"]},
                   headers={"Referer": f"{self.url}/user/login/"})
        assert r.status_code == 302, f"login: HTTP {r.status_code} {r.text[:300]}"
        return s

    def _create_token(self) -> str:
        s = self.login()
        r = s.post(f"{self.url}/api/token/", json={}, timeout=60,
                   headers={"X-CSRFToken": s.cookies["csrftoken"], "Referer": f"{self.url}/"})
        assert r.status_code == 201, f"POST /api/token/: HTTP {r.status_code} {r.text[:300]}"
        return r.json()["token"]

    def version(self) -> str:
        return self.api.json("GET", "/api/version/").get("release", "?")

    def stop(self) -> None:
        self.proc.stop()


def backend_env(**overrides: str) -> dict[str, str]:
    """This tree's backend with the fixture models and their inference settings, embedded cache."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTSAM_", "REDIS_", "LABEL_STUDIO", "OPEN_CLIP", "CLIP_", "BASIC_AUTH"))}
    env.update(FASTSAM_WEIGHTS=str(MODELS / "fastsam-shapes.pt"), IMGSZ="640", CONF="0.1", IOU="0.7",
               FASTSAM_ALLOW_DOWNLOAD="false", OPEN_CLIP_MODEL=str(MODELS / "clip-shapes.json"),
               OPEN_CLIP_PRETRAINED=str(MODELS / "clip-shapes.pt"), BIND_HOST="127.0.0.1", WORKERS="1",
               THREADS="4", LOG_LEVEL="INFO", PYTHONPATH=str(ROOT))
    env.update(overrides)
    return env


class Backend:
    """``python -m fastsam_backend serve`` of this tree; ``restart()`` keeps port and settings."""

    def __init__(self, tmp: Path, ls: LabelStudio, name: str = "backend", **env: str) -> None:
        self.tmp, self.name, self.port = tmp, name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = backend_env(**{"PORT": str(self.port), "MODEL_DIR": str(tmp / "models"),
                                  "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat, **env})
        self.proc: Proc | None = None
        self.starts = 0

    def start(self) -> Backend:
        self.starts += 1
        log = self.tmp / f"{self.name}.log"
        self.proc = Proc(self.name, [sys.executable, "-m", "fastsam_backend", "serve"], self.env, log, ROOT)
        try:
            self.proc.wait_http(f"{self.url}/health", 120)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=10).json()
