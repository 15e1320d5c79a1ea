"""A small stand-in for Label Studio's REST API: the endpoints label-studio-sdk calls to pre-annotate.

``GET /api/projects/<id>/``, ``GET /api/tasks/?project=&page=&page_size=`` (404 past the last page,
as Label Studio answers), ``GET /api/tasks/<id>/``, ``GET|POST /api/predictions/`` and the task
images under ``/data/upload/`` (``delays`` slows some down). Tokens are checked (``Token <key>``).
Cloud storage: ``cloud`` maps ``s3://...`` URIs to files under ``root``, served as Label Studio serves
them with "Use pre-signed URLs" off: ``GET /tasks/<id>/resolve/?fileuri=<urlsafe base64>`` streams the
bytes to a user with a token, for a task that exists (404 otherwise, 424 for a missing object).
``fail_posts`` makes that many prediction POSTs answer 503 *after* storing the prediction -- the
lost-answer case a careful client must not turn into a duplicate. For tests, benchmarks and the
demonstration run in docs/scaling.md; real-Label-Studio tests live under ``tests/real_ls/``.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class FakeLabelStudio:
    """State of the fake: projects, tasks, predictions; ``requests`` counts calls per route."""

    root: Path  # served at /data/upload/... (the task images)
    token: str = "f" * 40
    projects: dict[int, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)
    fail_posts: int = 0
    delays: dict[str, float] = field(default_factory=dict)  # image path -> seconds before it is served
    cloud: dict[str, str] = field(default_factory=dict)  # cloud URI -> file under root (None: a missing object)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_project(self, project_id: int, label_config: str) -> None:
        self.projects[project_id] = {"id": project_id, "title": f"project {project_id}", "label_config": label_config}

    def add_task(self, project_id: int, data: dict[str, Any], annotations: list[list[Any]] | None = None) -> int:
        """``annotations``: each annotation's ``result`` (LS regions), as annotators submitted them."""
        with self.lock:
            task_id = len(self.tasks) + 1
            anns = [{"id": 1000 * task_id + i, "task": task_id, "result": r, "was_cancelled": False}
                    for i, r in enumerate(annotations or [])]
            self.tasks[task_id] = {"id": task_id, "project": project_id, "data": data, "annotations": anns}
            return task_id

    def predictions_of(self, task_id: int) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.predictions if p["task"] == task_id]

    def _task_view(self, task: dict[str, Any]) -> dict[str, Any]:
        preds = [p for p in self.predictions if p["task"] == task["id"]]
        versions = ", ".join(sorted({str(p["model_version"]) for p in preds}))  # LS: a display string
        anns = task.get("annotations", [])
        return {**task, "annotations": anns, "predictions": preds, "total_predictions": len(preds),
                "predictions_model_versions": versions,
                "total_annotations": len(anns), "cancelled_annotations": 0}

    # ------------------------------------------------------------------------------ the routes
    def resolve(self, url: str, headers: Any) -> tuple[int, bytes]:
        """``GET /tasks/<id>/resolve/?fileuri=``: a cloud object's bytes (counted as ``GET /tasks/resolve``)."""
        parts = urlsplit(url)
        with self.lock:
            self.requests["GET /tasks/resolve"] = self.requests.get("GET /tasks/resolve", 0) + 1
        if headers.get("Authorization", "") not in (f"Token {self.token}", f"Bearer {self.token}"):
            return 401, b""
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) != 3 or not segments[1].isdigit() or int(segments[1]) not in self.tasks:
            return 404, b""
        try:
            uri = base64.urlsafe_b64decode(parse_qs(parts.query)["fileuri"][0]).decode()
        except (KeyError, ValueError):
            return 400, b""
        if uri not in self.cloud:
            return 404, b""  # no storage matches the URI
        path = self.root / self.cloud[uri]
        return (200, path.read_bytes()) if path.is_file() else (424, b'{"error": "Storage stream failed"}')

    def handle(self, method: str, url: str, headers: Any, body: bytes) -> tuple[int, Any]:
        parts = urlsplit(url)
        path, query = parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}
        route = f"{method} {path.rstrip('/').rsplit('/', 1)[0] if path.rstrip('/').split('/')[-1].isdigit() else path}"
        with self.lock:
            self.requests[route] = self.requests.get(route, 0) + 1
        auth = headers.get("Authorization", "")
        if auth not in (f"Token {self.token}", f"Bearer {self.token}"):
            return 401, {"detail": "Authentication credentials were not provided."}
        segments = [s for s in path.split("/") if s]
        with self.lock:
            if method == "GET" and segments[:2] == ["api", "projects"] and len(segments) == 3:
                project = self.projects.get(int(segments[2]))
                return (200, project) if project else (404, {"detail": "Not found."})
            if method == "GET" and segments == ["api", "tasks"]:
                return self._list_tasks(query)
            if method == "GET" and segments[:2] == ["api", "tasks"] and len(segments) == 3:
                task = self.tasks.get(int(segments[2]))
                return (200, self._task_view(task)) if task else (404, {"detail": "Not found."})
            if segments == ["api", "predictions"]:
                if method == "GET":
                    task = int(query["task"]) if "task" in query else None
                    return 200, [p for p in self.predictions if task is None or p["task"] == task]
                if method == "POST":
                    return self._create_prediction(json.loads(body or b"{}"))
        return 404, {"detail": "Not found."}

    def _list_tasks(self, query: dict[str, str]) -> tuple[int, Any]:
        project = int(query.get("project", 0))
        page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
        tasks = [t for t in self.tasks.values() if t["project"] == project]
        chunk = tasks[(page - 1) * size:page * size]
        if page > 1 and not chunk:
            return 404, {"detail": "Invalid page."}
        ids = {t["id"] for t in tasks}
        return 200, {"tasks": [self._task_view(t) for t in chunk], "total": len(tasks), "total_annotations": 0,
                     "total_predictions": sum(p["task"] in ids for p in self.predictions)}

    def _create_prediction(self, data: dict[str, Any]) -> tuple[int, Any]:
        if int(data.get("task", 0)) not in self.tasks or not isinstance(data.get("result"), list):
            return 400, {"detail": "task and result are required"}
        prediction = {"id": len(self.predictions) + 1, "task": int(data["task"]), "result": data["result"],
                      "score": data.get("score"), "model_version": data.get("model_version")}
        self.predictions.append(prediction)
        if self.fail_posts > 0:  # stored, but the answer is lost
            self.fail_posts -= 1
            return 503, {"detail": "Service Unavailable"}
        return 201, prediction


def serve(fake: FakeLabelStudio, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Start it on 127.0.0.1 in a daemon thread; returns the server (``shutdown()`` it) and its URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(fake.root), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

        def _api(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            status, payload = fake.handle(method, self.path, self.headers, self.rfile.read(length) if length else b"")
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.startswith("/api/"):
                self._api("GET")
                return
            if self.path.startswith("/tasks/"):
                status, data = fake.resolve(self.path, self.headers)
                self.send_response(status)
                self.send_header("Content-Type", "image/png" if status == 200 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if delay := fake.delays.get(urlsplit(self.path).path):
                time.sleep(delay)  # a slow image host: keeps a job busy long enough to kill its worker
            super().do_GET()

        def do_POST(self) -> None:
            self._api("POST")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
