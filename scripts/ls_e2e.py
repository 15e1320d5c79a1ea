"""End-to-end check of the backend against a real Label Studio server.

Starts Label Studio (from its own venv, e.g. ``python3 -m venv /work/ls-venv &&
/work/ls-venv/bin/pip install label-studio==1.23.2``) and our backend on loopback ports, with a
small logging proxy in between, then drives Label Studio's API the way its UI does:

 1. create a project with the test label config and upload a generated scene (PNG);
 2. connect the backend (``POST /api/ml``, interactive) and check LS validated it;
 3. a keypoint click and a box through ``POST /api/ml/<id>/interactive-annotating``: the answer
    must carry our BrushLabels region, image-sized, containing the clicked pixel;
 4. "Retrieve predictions" (``POST /api/dm/actions?id=retrieve_tasks_predictions``) over the
    task, a second task with the same image and a third whose image LS cannot serve: predictions
    with our model version must be stored on the first two, none on the third, and LS's log must
    carry our error for it (a broken image must not cost the batch its other predictions).

Prints PASS/FAIL per step, stops both servers (always), and prints where the logs are. Runs with
the project venv (requests, numpy, cv2, label_studio_sdk)::

    .venv/bin/python scripts/ls_e2e.py [--auth legacy|pat] [--basic-auth]
        [--capture-out tests/fixtures/ls-interactive-requests.json]

Exit status 0 when every step passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsam_backend.quality.net import free_port  # noqa: E402
from fastsam_backend.quality.scenes import generate_scene  # noqa: E402
from tests.helpers import LABEL_CONFIG, interior_point, png_bytes  # noqa: E402

SCENE_SEED = 1_000_003
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "content-length", "host"}
SECRET_KEYS = {"access_token", "token", "password", "basic_auth_pass", "api_key"}


# ----------------------------------------------------------------------------- plumbing


class Server:
    """A child process in its own session, logging to ``log``; ``stop()`` is bounded."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.name, self.log = name, log
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 20) -> None:
        if self.alive():
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log_file.close()


def wait_for(url: str, timeout_s: float, server: Server, ok=lambda r: r.status_code == 200) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}; see {server.log}")
        try:
            r = requests.get(url, timeout=5)
            if ok(r):
                return r
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as exc:
            last = exc
        time.sleep(2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s (last: {last})")


class Redactor:
    """Replaces secrets and local addresses in captured bodies by placeholders."""

    def __init__(self) -> None:
        self.replacements: list[tuple[str, str]] = []

    def add(self, value: str | None, placeholder: str) -> None:
        if value:
            self.replacements.append((value, placeholder))

    def text(self, s: str) -> str:
        for value, placeholder in self.replacements:
            s = s.replace(value, placeholder)
        return s

    def json(self, obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: ("<redacted>" if k.lower() in SECRET_KEYS and v else self.json(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.json(v) for v in obj]
        return self.text(obj) if isinstance(obj, str) else obj


class CaptureProxy:
    """Forwards everything to the backend and records what Label Studio sent (bodies kept in memory)."""

    def __init__(self, target: str, log: Path) -> None:
        self.target, self.exchanges, self._lock = target, [], threading.Lock()
        self._log = log.open("a")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                started = time.perf_counter()
                try:
                    r = requests.request(self.command, proxy.target + self.path, data=body or None,
                                         headers=headers, timeout=300)
                    status, content, ctype = r.status_code, r.content, r.headers.get("Content-Type", "")
                except requests.RequestException as exc:
                    status, content, ctype = 502, json.dumps({"proxy_error": str(exc)}).encode(), "application/json"
                elapsed_ms = 1000 * (time.perf_counter() - started)
                proxy.record(self.command, self.path, dict(self.headers), body, status, content, elapsed_ms)
                self.send_response(status)
                self.send_header("Content-Type", ctype or "application/octet-stream")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def record(self, method: str, path: str, headers: dict, body: bytes, status: int, content: bytes,
               elapsed_ms: float) -> None:
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = body[:200].decode("latin-1")
        auth = headers.get("Authorization") or headers.get("authorization")
        user_agent = headers.get("User-Agent") or headers.get("user-agent")
        entry = {"method": method, "path": path, "user_agent": user_agent, "body": parsed, "status": status,
                 "elapsed_ms": elapsed_ms,
                 "auth_scheme": auth.split()[0] if auth else None, "response": content[:4000].decode("latin-1")}
        with self._lock:
            self.exchanges.append(entry)
            self._log.write(f"{time.strftime('%H:%M:%S')} {method} {path} -> {status} in {elapsed_ms:.0f} ms, "
                            f"request {len(body)} B, response {len(content)} B, auth {entry['auth_scheme']}\n")
            self._log.flush()

    def find(self, path: str, predicate=lambda e: True) -> list[dict]:
        with self._lock:
            return [e for e in self.exchanges if e["path"] == path and predicate(e)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._log.close()


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, step: str, ok: bool | None, detail: str = "") -> bool:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
        self.rows.append((step, verdict, detail))
        print(f"[{verdict}] {step}: {detail}", flush=True)
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(v == "PASS" for _, v, _ in self.rows)

    def summary(self) -> str:
        width = max(len(s) for s, _, _ in self.rows)
        return "\n".join(f"  {v}  {s:<{width}}  {d[:160]}" for s, v, d in self.rows)


# ----------------------------------------------------------------------------- prompts and checks


def is_interactive(exchange: dict) -> bool:
    """A captured /predict that carried a context (a click, a box, a text prompt)."""
    return bool(((exchange["body"] or {}).get("params") or {}).get("context"))


def is_batch(exchange: dict) -> bool:
    return not is_interactive(exchange)


def ui_keypoint(x: int, y: int, width: int, height: int, label: str, positive: bool = True) -> dict:
    """A smart keypoint as the LS 1.23.2 UI serializes it for interactive-annotating.

    From ``web/dist/apps/labelstudio/358.js``: ``KeyPointRegion.serialize`` gives
    ``{original_width, original_height, image_rotation, value: {x, y, width}}`` and, for a smart
    (dynamic) region, ``is_positive = !negative`` and ``value.labels``; ``Result.serialize`` adds
    ``id, from_name, to_name, type, origin`` and ``value.keypointlabels``. ``x, y``: pixel centre.
    """
    return {"original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100.0 * (x + 0.5) / width, "y": 100.0 * (y + 0.5) / height, "width": 0.5,
                      "labels": [label], "keypointlabels": [label]},
            "is_positive": positive, "id": "Kp3e2eT9aQ", "from_name": "tag2", "to_name": "image",
            "type": "keypointlabels", "origin": "manual"}


def ui_rectangle(box: tuple[int, int, int, int], width: int, height: int, label: str) -> dict:
    """A smart rectangle as the LS 1.23.2 UI serializes it; ``box``: x0, y0, x1, y1 pixels (exclusive)."""
    x0, y0, x1, y1 = box
    return {"original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100.0 * x0 / width, "y": 100.0 * y0 / height, "width": 100.0 * (x1 - x0) / width,
                      "height": 100.0 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label]},
            "id": "Rb7e2eW2cZ", "from_name": "tag3", "to_name": "image", "type": "rectanglelabels",
            "origin": "manual"}


def decode_brush(region: dict) -> np.ndarray:
    """The region's mask, (original_height, original_width) bool."""
    from label_studio_sdk.converter.brush import decode_rle

    h, w = region["original_height"], region["original_width"]
    flat = np.asarray(decode_rle(region["value"]["rle"]), np.uint8)
    if flat.size != h * w * 4:
        raise ValueError(f"RLE decodes to {flat.size} values, expected {h}x{w}x4 = {h * w * 4}")
    return flat.reshape(h, w, 4)[:, :, 0] > 0


def brush_regions(result: list[dict]) -> list[dict]:
    return [r for r in result if r.get("type") == "brushlabels"]


def check_interactive_answer(answer: dict, size: tuple[int, int], pixel: tuple[int, int] | None,
                             target: np.ndarray) -> tuple[bool, str]:
    """``answer``: LS's JSON ({"data": {...}} or {"errors": [...]}); ``size`` (h, w); ``pixel`` (x, y)."""
    if "data" not in answer:
        return False, f"no 'data' in LS answer: {json.dumps(answer)[:500]}"
    regions = brush_regions(answer["data"].get("result") or [])
    if not regions:
        return False, f"no brushlabels region in {json.dumps(answer['data'])[:500]}"
    region = regions[0]
    mask = decode_brush(region)
    h, w = size
    if mask.shape != (h, w):
        return False, f"mask is {mask.shape}, image is {(h, w)}"
    inter, union = np.logical_and(mask, target).sum(), np.logical_or(mask, target).sum()
    detail = (f"{len(regions)} brush region(s), label {region['value'].get('brushlabels')}, "
              f"{int(mask.sum())} px, IoU with the object {inter / max(union, 1):.3f}, "
              f"model_version {answer['data'].get('model_version')}")
    if pixel is not None and not mask[pixel[1], pixel[0]]:
        return False, f"clicked pixel {pixel} not in the mask; {detail}"
    if not mask.any():
        return False, f"empty mask; {detail}"
    return True, detail


# ----------------------------------------------------------------------------- the run


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label-studio", default="/work/ls-venv/bin/label-studio", help="label-studio executable")
    default_weights = ROOT / "tests/fixtures/models/fastsam-shapes.pt"
    p.add_argument("--weights", default=str(default_weights), help="FASTSAM_WEIGHTS for the backend")
    p.add_argument("--auth", choices=["legacy", "pat"], default="legacy",
                   help="LABEL_STUDIO_API_KEY the backend gets: the legacy token or a personal access token")
    p.add_argument("--basic-auth", action="store_true", help="protect the backend with basic auth")
    p.add_argument("--no-credentials", action="store_true",
                   help="give the backend no LABEL_STUDIO_URL/API_KEY (it must use /setup's hostname/token)")
    p.add_argument("--no-proxy", action="store_true", help="connect LS to the backend directly (no capture)")
    p.add_argument("--capture-out", help="write the interactive /predict bodies LS sent to this JSON file")
    p.add_argument("--ls-start-timeout", type=float, default=600, help="seconds (first start runs migrations)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs are always kept)")
    return p.parse_args()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(f"signal {signum}")  # runs the cleanup in main's finally


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="ls-e2e-"))
    logs = {"label_studio": tmp / "label-studio.log", "backend": tmp / "backend.log", "proxy": tmp / "proxy.log"}
    report, servers, proxy = Report(), [], None
    ls_port, be_port = free_port(), free_port()
    ls_url, be_url = f"http://127.0.0.1:{ls_port}", f"http://127.0.0.1:{be_port}"
    user, password, token = "e2e@example.com", secrets.token_urlsafe(12), secrets.token_hex(20)
    redact = Redactor()
    for value, placeholder in [(token, "<token>"), (password, "<password>"), (ls_url, "http://label-studio:8080"),
                               (f"http://localhost:{ls_port}", "http://label-studio:8080"),
                               (be_url, "http://fastsam-backend:9090")]:
        redact.add(value, placeholder)
    weights = Path(args.weights)
    if not weights.exists():
        fallback = ROOT / "work-tmp/random-biased.pt"
        print(f"NOTE: {weights} does not exist; using {fallback} (an untrained model: masks may be poor)")
        weights = fallback
    print(f"temp dir {tmp}\nlogs: " + ", ".join(f"{k} {v}" for k, v in logs.items()), flush=True)

    try:
        # -- Label Studio
        env = {**os.environ, "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
               "LABEL_STUDIO_USERNAME": user, "LABEL_STUDIO_PASSWORD": password,
               "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_BASE_DATA_DIR": str(tmp / "ls-base"),
               # loopback only: no version check on PyPI, no analytics, no Sentry
               "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "",
               "FRONTEND_SENTRY_DSN": ""}
        started = time.monotonic()
        ls = Server("label-studio", [args.label_studio, "start", "--no-browser", "--port", str(ls_port),
                                     "--data-dir", str(tmp / "ls-data"), "--enable-legacy-api-token"],
                    env, logs["label_studio"], tmp)
        servers.append(ls)
        wait_for(f"{ls_url}/health", args.ls_start_timeout, ls)
        api = requests.Session()
        api.headers["Authorization"] = f"Token {token}"
        ls_version = api.get(f"{ls_url}/api/version/", timeout=60).json().get("release")
        report.add("label studio started", True, f"version {ls_version} in {time.monotonic() - started:.0f} s")
        r = api.get(f"{ls_url}/api/current-user/whoami", timeout=30)
        if not report.add("legacy token accepted", r.status_code == 200, f"HTTP {r.status_code}"):
            return 1
        api_key = token
        if args.auth == "pat":
            r = api.post(f"{ls_url}/api/token/", json={}, timeout=30)
            ok = r.status_code in (200, 201) and "token" in r.json()
            report.add("personal access token created", ok, f"HTTP {r.status_code}")
            if not ok:
                return 1
            api_key = r.json()["token"]
            redact.add(api_key, "<personal-access-token>")

        # -- our backend, behind the capturing proxy
        be_env = {**os.environ, "PORT": str(be_port), "BIND_HOST": "127.0.0.1", "FASTSAM_WEIGHTS": str(weights),
                  "IMGSZ": "640", "CONF": "0.1", "IOU": "0.7", "FASTSAM_ALLOW_DOWNLOAD": "false",
                  "LOG_LEVEL": "DEBUG", "WORKERS": "1", "THREADS": "4"}
        for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN",
                  "REDIS_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
            be_env.pop(k, None)
        if not args.no_credentials:
            be_env.update(LABEL_STUDIO_URL=ls_url, LABEL_STUDIO_API_KEY=api_key)
        else:  # /setup's hostname is not trusted by itself: Label Studio on loopback must be allowed
            be_env.update(OUTBOUND_ALLOW=f"127.0.0.1:{ls_port},localhost:{ls_port}")
        basic = ("e2e", secrets.token_urlsafe(12)) if args.basic_auth else None
        if basic:
            be_env.update(BASIC_AUTH_USER=basic[0], BASIC_AUTH_PASS=basic[1])
            redact.add(basic[1], "<basic-auth-pass>")
        be = Server("backend", [str(ROOT / ".venv/bin/python"), "-m", "fastsam_backend", "serve"],
                    be_env, logs["backend"], ROOT)
        servers.append(be)
        health = wait_for(f"{be_url}/health", 120, be).json()
        report.add("backend started", bool(health.get("ready")), json.dumps(health))
        if args.no_proxy:
            ml_url = be_url
        else:
            proxy = CaptureProxy(be_url, logs["proxy"])
            ml_url = f"http://127.0.0.1:{proxy.port}"
            redact.add(ml_url, "http://fastsam-backend:9090")

        # -- project and task
        r = api.post(f"{ls_url}/api/projects", json={"title": "fastsam e2e", "label_config": LABEL_CONFIG},
                     timeout=60)
        if not report.add("project created", r.status_code == 201, f"HTTP {r.status_code} {r.text[:200]}"):
            return 1
        project = r.json()["id"]
        scene = generate_scene(SCENE_SEED)
        h, w = scene.image.shape[:2]
        r = api.post(f"{ls_url}/api/projects/{project}/import",
                     files={"file": ("scene.png", png_bytes(scene.image), "image/png")}, timeout=120)
        tasks: list[dict] = []
        deadline = time.monotonic() + 60
        while r.status_code == 201 and not tasks and time.monotonic() < deadline:
            listed = api.get(f"{ls_url}/api/tasks", params={"project": project}, timeout=30).json()
            tasks = listed["tasks"] if isinstance(listed, dict) else listed
            time.sleep(0 if tasks else 1)
        if not report.add("image uploaded", bool(tasks), f"HTTP {r.status_code}, {len(tasks)} task(s), "
                          f"{w}x{h} px, data {tasks[0]['data'] if tasks else r.text[:200]}"):
            return 1
        task_id = tasks[0]["id"]

        # -- connect the ML backend
        ml_body = {"url": ml_url, "project": project, "is_interactive": True, "title": "fastsam"}
        if basic:
            ml_body.update(auth_method="BASIC_AUTH", basic_auth_user=basic[0], basic_auth_pass=basic[1])
        r = api.post(f"{ls_url}/api/ml", json=ml_body, timeout=60)
        detail = f"HTTP {r.status_code} {redact.text(r.text[:300])}"
        if not report.add("ML backend added", r.status_code == 201, detail):
            return 1
        ml_id = r.json()["id"]
        ml = api.get(f"{ls_url}/api/ml/{ml_id}", timeout=30).json()
        setups = proxy.find("/setup") if proxy else []
        report.add("ML backend validated by LS", ml.get("state") == "CO",
                   f"state {ml.get('state')} ({ml.get('readable_state')}), error {ml.get('error_message')!r}, "
                   f"model_version {ml.get('model_version')!r}, /setup answers "
                   f"{[e['status'] for e in setups] if proxy else 'not captured'}")

        # -- interactive: a keypoint click, then a box
        target = max(scene.objects, key=lambda o: int(o.mask.sum()))
        px, py = interior_point(target.mask)
        prompts = {
            "keypoint": (ui_keypoint(px, py, w, h, label="Banana"), (px, py)),
            "rectangle": (ui_rectangle(target.box, w, h, label="Orange"), None),
        }
        captured = []
        for name, (region, pixel) in prompts.items():
            started = time.monotonic()
            r = api.post(f"{ls_url}/api/ml/{ml_id}/interactive-annotating",
                         json={"task": task_id, "context": {"result": [region]}}, timeout=180)
            elapsed = time.monotonic() - started
            if r.status_code != 200:
                report.add(f"interactive {name}", False, f"HTTP {r.status_code} {redact.text(r.text[:500])}")
                continue
            ok, detail = check_interactive_answer(r.json(), (h, w), pixel, target.mask)
            report.add(f"interactive {name}", ok, f"{detail}, {elapsed:.1f} s ({target.colour} {target.shape} "
                                                  f"at {(px, py)}, box {target.box})")
            if proxy:
                sent = proxy.find("/predict", is_interactive)
                if sent:
                    captured.append(sent[-1])
        if proxy:
            ok = len(captured) == len(prompts)
            report.add("interactive /predict bodies captured", ok,
                       ", ".join(f"HTTP {e['status']} in {e['elapsed_ms']:.0f} ms, auth {e['auth_scheme']}"
                                 for e in captured))
            if ok and args.capture_out:
                out = {"captured_from": f"Label Studio {ls_version} (pip install label-studio), "
                                        "POST /api/ml/<id>/interactive-annotating driven by scripts/ls_e2e.py, "
                                        "bodies as forwarded to our /predict (a keypoint click, then a box)",
                       "requests": [{"method": e["method"], "path": e["path"], "user_agent": e["user_agent"],
                                     "body": redact.json(e["body"])} for e in captured]}
                text = json.dumps(out, indent=2) + "\n"
                assert token not in text and password not in text and api_key not in text
                Path(args.capture_out).write_text(text)
                print(f"wrote {args.capture_out}")

        # -- batch: "Retrieve predictions" on all tasks, one of them with an image LS cannot serve
        r = api.post(f"{ls_url}/api/projects/{project}/import", timeout=60,
                     json=[{"image": tasks[0]["data"]["image"]}, {"image": "/data/upload/999/missing.png"}])
        listed = api.get(f"{ls_url}/api/tasks", params={"project": project}, timeout=30).json()
        all_tasks = listed["tasks"] if isinstance(listed, dict) else listed
        extra = [t for t in all_tasks if t["id"] != task_id]
        broken = [t["id"] for t in extra if "missing.png" in t["data"].get("image", "")]
        good = [task_id] + [t["id"] for t in extra if t["id"] not in broken]
        report.add("two more tasks imported", r.status_code == 201 and len(good) == 2 and len(broken) == 1,
                   f"HTTP {r.status_code}, tasks {good} + broken {broken}")
        started = time.monotonic()
        r = api.post(f"{ls_url}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                     json={"selectedItems": {"all": True, "excluded": []}}, timeout=300)
        elapsed = time.monotonic() - started
        report.add("retrieve predictions action", r.status_code == 200,
                   f"HTTP {r.status_code} {r.text[:200]} in {elapsed:.1f} s")
        ml = api.get(f"{ls_url}/api/ml/{ml_id}", timeout=30).json()
        version = ml.get("model_version")
        preds = api.get(f"{ls_url}/api/predictions", params={"task": task_id}, timeout=30).json()
        ours = [p for p in preds if p.get("model_version") == version]
        if not ours:
            batch = proxy.find("/predict", is_batch) if proxy else []
            report.add("prediction stored", False,
                       f"ML record model_version {version!r}; stored {[p.get('model_version') for p in preds]}; "
                       f"batch /predict calls {[(e['status'], e['response'][:300]) for e in batch]}")
        else:
            pred = ours[0]
            regions = brush_regions(pred["result"])
            masks = [decode_brush(reg) for reg in regions]
            hit = any(m[py, px] for m in masks)
            ok = bool(regions) and all(m.shape == (h, w) for m in masks)
            report.add("prediction stored", ok,
                       f"model_version {version!r}, score {pred.get('score')}, {len(pred['result'])} region(s) "
                       f"({len(regions)} brush, types {sorted({x['type'] for x in pred['result']})}), "
                       f"clicked object covered by one: {hit}")

        stored = {t: [p for p in api.get(f"{ls_url}/api/predictions", params={"task": t}, timeout=30).json()
                      if p.get("model_version") == version] for t in good + broken}
        batch = proxy.find("/predict", is_batch) if proxy else []
        ls_log = logs["label_studio"].read_text(errors="replace") if logs["label_studio"].exists() else ""
        # (LS 1.23.2 answers a missing upload with a 500, not a 404)
        our_error = any("tasks[" in line and "could not fetch image" in line for line in ls_log.splitlines())
        ok = all(stored[t] for t in good) and not any(stored[t] for t in broken) and our_error
        report.add("batch with a broken image keeps the other predictions", ok,
                   f"stored per task {({t: len(v) for t, v in stored.items()})}; batch /predict calls "
                   f"{[(len((e['body'] or {}).get('tasks') or []), e['status']) for e in batch]} (tasks, HTTP); "
                   f"our error in LS's log: {our_error}")

        # -- "Retrieve predictions" again: LS must send only the task without a prediction (what a
        #    deferred or failed task relies on to be retried)
        if proxy:
            calls = len(batch)
            api.post(f"{ls_url}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                     json={"selectedItems": {"all": True, "excluded": []}}, timeout=300)
            again = proxy.find("/predict", is_batch)
            sent = [[t.get("id") for t in (e["body"] or {}).get("tasks") or []] for e in again[calls:]]
            report.add("next run sends only the tasks without a prediction", sent == [broken],
                       f"second run's /predict calls carried task ids {sent} (broken {broken})")

        # -- interactive again, now that the task carries the stored prediction (LS forwards it)
        region, pixel = prompts["keypoint"]
        started = time.monotonic()
        r = api.post(f"{ls_url}/api/ml/{ml_id}/interactive-annotating",
                     json={"task": task_id, "context": {"result": [region]}}, timeout=180)
        elapsed = time.monotonic() - started
        ok, detail = check_interactive_answer(r.json(), (h, w), pixel, target.mask) if r.status_code == 200 \
            else (False, f"HTTP {r.status_code} {redact.text(r.text[:500])}")
        sent = proxy.find("/predict") if proxy else []
        size = f", LS sent {len(json.dumps(sent[-1]['body'])) / 1e3:.0f} kB to /predict" if sent else ""
        report.add("interactive keypoint on a task with predictions", ok, f"{elapsed:.1f} s{size}; {detail}")
        return 0 if report.passed else 1
    except Exception as exc:  # report, then clean up
        report.add("run", False, f"{type(exc).__name__}: {redact.text(str(exc))[:800]}")
        return 1
    finally:
        if proxy:
            proxy.stop()
        for server in reversed(servers):
            server.stop()
        print("\nsummary:\n" + (report.summary() if report.rows else "  (no step ran)"))
        print(f"\nlabel studio log: {logs['label_studio']}\nbackend log:      {logs['backend']}\n"
              f"proxy log:        {logs['proxy']}")
        if not args.keep:
            import shutil

            for sub in ("ls-data", "ls-base"):
                shutil.rmtree(tmp / sub, ignore_errors=True)
        print("RESULT:", "PASS" if report.passed else "FAIL")


if __name__ == "__main__":
    sys.exit(main())
