"""The warm click's transport floor: gunicorn + loopback socket + the requests client, no app.

A trivial WSGI app (reads the whole body, answers a fixed body the size of a real answer) under
gunicorn with each worker class a click could use, driven with the warm run's bodies exactly as
the warm HTTP run drives the backend. ``HTTP latency - Server-Timing app - this floor`` is what
neither the app nor the transport explains (scheduling on a shared machine).
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from fastsam_backend.quality.net import free_port

from .common import Context, stats_ms

APP = r"""
import sys
from gunicorn.app.base import BaseApplication
port, worker_class, threads, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
answer = b'{"results": "' + b"x" * max(0, size - 16) + b'"}'
def app(environ, start_response):
    stream, left = environ["wsgi.input"], int(environ.get("CONTENT_LENGTH") or 0)
    while left > 0:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            break
        left -= len(chunk)
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
    return [answer]
class Server(BaseApplication):
    def load_config(self):
        for k, v in {"bind": f"127.0.0.1:{port}", "workers": 1, "threads": threads, "worker_class": worker_class,
                     "accesslog": None, "loglevel": "warning", "control_socket_disable": True}.items():
            self.cfg.set(k, v)
    def load(self):
        return app
Server().run()
"""
CLASSES = (("gthread", 4), ("sync", 1))  # gevent / eventlet are not installed here


def _floor(bodies: list[bytes], worker_class: str, threads: int, answer_bytes: int) -> dict[str, Any]:
    import requests

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", APP, str(port), worker_class, str(threads), str(answer_bytes)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(base, timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"trivial gunicorn ({worker_class}) did not start") from None
                time.sleep(0.1)
        headers = {"Content-Type": "application/json"}
        times = []
        with requests.Session() as http:
            for body in bodies[:5]:
                http.post(base, data=body, headers=headers, timeout=30)
            for body in bodies:
                started = time.perf_counter()
                _ = http.post(base, data=body, headers=headers, timeout=30).content
                times.append(time.perf_counter() - started)
        return {"worker_class": worker_class, "threads": threads, "latency": stats_ms(times)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    answer = int(ctx.shared.get("warm_http", {}).get("response_body_bytes", {}).get("median", 2000))
    floors = {f"{cls}x{threads}": _floor(inputs["bodies"], cls, threads, answer) for cls, threads in CLASSES}
    tiny = [b'{"tasks": [], "context": {}}'] * len(inputs["bodies"])  # what the transport costs without LS's body
    floors["gthreadx4_tiny_body"] = _floor(tiny, "gthread", 4, answer)
    return {"what": "trivial WSGI app under gunicorn: same bodies, same client, no backend work",
            "answer_bytes": answer, "floors": floors}
