"""HTTP layer: Label Studio's ML backend protocol on Flask. Only translates HTTP.

``create_app()`` builds everything from the environment; nothing heavy happens at
import or in the factory (the model loads on the first /predict), so gunicorn can
fork workers safely and /health, /setup answer in milliseconds.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any

import orjson
from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from redis import RedisError
from werkzeug.exceptions import HTTPException

from fastsam_backend import metrics
from fastsam_backend.errors import BackendError, BadRequest
from fastsam_backend.jobs.collector import JobsCollector
from fastsam_backend.jobs.enqueue import warm_new_tasks
from fastsam_backend.jobs.learn import LearnDispatch
from fastsam_backend.jobs.queues import JobQueues, QueueConfig
from fastsam_backend.ls.annotations import ANNOTATION_EVENTS
from fastsam_backend.ls.protocol import NOT_A_JSON_OBJECT, decode_predict, decode_setup
from fastsam_backend.service.orchestrator import FastSAMService, build_service
from fastsam_backend.settings import Settings, load_settings

log = logging.getLogger(__name__)

MODEL_CLASS = "FastSAMBackend"
TASKS_CREATED = "TASKS_CREATED"  # enqueues warm jobs for the new tasks' images (docs/scaling.md)
TRAIN_EVENTS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                "ANNOTATION_DELETED", "START_TRAINING"}  # annotations teach labels (jobs/learn.py)
UNAUTHENTICATED_ROUTES = {"/", "/health"}  # orchestrator probes carry no credentials


class OrjsonProvider(DefaultJSONProvider):
    """orjson for bodies: LS sends every task with its annotations' brush RLE (hundreds of kB),
    and parsing them with the stdlib took most of a warm click (bench: 12 of 19 ms)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def create_app(settings: Settings | None = None, service: FastSAMService | None = None) -> Flask:
    """Build the Flask app; tests pass their own settings or service."""
    settings = settings or load_settings()
    service = service or build_service(settings)
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["fastsam_service"] = service
    if settings.load_on_start:
        service.models.start_loading()  # gunicorn calls the factory in each worker, after fork

    @app.before_request
    def _start() -> Response | None:
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:12]
        g.started = time.perf_counter()
        if settings.basic_auth_user and request.path not in UNAUTHENTICATED_ROUTES:
            return _check_basic_auth(settings)
        return None

    @app.after_request
    def _finish(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        metrics.REQUESTS.labels(route=route, method=request.method, status=str(response.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(route=route).observe(elapsed)
        response.headers["X-Request-Id"] = g.get("request_id", "")
        # time inside the app (browser dev tools show it; the bench splits client-side latency with it)
        response.headers["Server-Timing"] = f"app;dur={1000 * elapsed:.2f}"
        log.debug("%s %s -> %s in %.1f ms [%s]", request.method, request.path, response.status_code,
                  1000 * elapsed, g.get("request_id"))
        return response

    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError) -> Response:
        metrics.ERRORS.labels(kind=type(exc).__name__).inc()
        log.warning("%s %s -> %d %s: %s [%s]", request.method, request.path, exc.status,
                    type(exc).__name__, exc.message, g.get("request_id"))
        response, status = _error(exc.message, exc.status)
        response.status = f"{status} {exc.reason}" if exc.reason else status
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        message = {413: f"request body larger than {settings.max_request_bytes} bytes"}.get(
            status, exc.description or exc.name
        )
        return _error(message, status)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        metrics.ERRORS.labels(kind="internal").inc()
        log.exception("unexpected error on %s %s [%s]", request.method, request.path, g.get("request_id"))
        return _error(f"internal error (request id {g.get('request_id')}; see the backend log)", 500)

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        """LS waits 1 s for it: never loads or downloads anything. ``state`` is ``loading``,
        ``ready`` or ``error`` (with ``error`` saying why); ``status`` stays ``UP`` so LS connects."""
        state = service.models.state()
        body: dict[str, Any] = {"status": "UP", "model_class": MODEL_CLASS, "ready": state["state"] != "error",
                                "model_loaded": service.segmenter.loaded, "model_version": service.model_version,
                                **state}
        if service.learner.unavailable() is None:
            body["learning"] = learning.health()  # where annotation events are learned; the last one learned here
            body["learning"]["projects"] = service.learner.health()  # per project: learned or zero-shot, and why
        body["recent_failures"] = service.failures.health()  # why the last /predict calls failed
        if service.settings.finetune_enabled:
            body["finetune"] = service.tuned.health()  # last decisions (every project) and tuned models loaded here
        if collectors:
            body["jobs"] = collectors[0].health()  # live workers per queue: 0 means its jobs wait
        return jsonify(body)

    @app.post("/setup")
    def setup() -> Response:
        return jsonify({"model_version": service.setup(decode_setup(_raw_json_body()))})

    @app.post("/predict")
    def predict() -> Response:
        return jsonify({"results": service.predict(decode_predict(_raw_json_body()))})

    queue_config = QueueConfig.from_settings(settings)
    queues: list[JobQueues] = []  # made on the first TASKS_CREATED (no Redis connection before)
    collectors = [JobsCollector(queue_config)] if queue_config is not None else []
    learning = LearnDispatch(service, queue_config, settings.learn_backlog)  # annotation events, off the request

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        body = _json_body()
        action = body.get("action")
        if action == TASKS_CREATED:
            if queue_config is None:
                return jsonify({"status": "ok", "warm": "off: REDIS_URL is unset (the job queues live in Redis)"}), 201
            if not queues:
                queues.append(JobQueues(queue_config))
            try:
                return jsonify({"status": "ok", "warm": warm_new_tasks(queues[0], service, body)}), 201
            except RedisError as exc:
                raise BackendError(f"could not enqueue warm jobs: Redis failed ({type(exc).__name__})",
                                   status=503) from None
        if not isinstance(action, str) or action not in TRAIN_EVENTS:
            return jsonify({"status": "Unknown event"}), 200
        if action in ANNOTATION_EVENTS:  # validated here, learned in the background (202)
            answer, status = learning.accept(action, body)
            return jsonify(answer), status
        return jsonify({"status": "ok", "result": service.fit(action, body)}), 201

    @app.get("/metrics")
    def prometheus() -> Response:
        payload, content_type = metrics.render(collectors)
        return Response(payload, content_type=content_type)

    return app


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify({"error": message, "status": status, "request_id": g.get("request_id")}), status


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest(NOT_A_JSON_OBJECT)
    return body


def _raw_json_body() -> bytes:
    """The body for the typed decoders in ``protocol`` (they parse it once, into structs)."""
    if not request.is_json:
        raise BadRequest(NOT_A_JSON_OBJECT)
    return request.get_data(cache=False)


def _check_basic_auth(settings: Settings) -> Response | None:
    auth = request.authorization
    expected_user = settings.basic_auth_user or ""
    expected_pass = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else ""
    ok = (
        auth is not None
        and auth.type == "basic"
        and hmac.compare_digest((auth.username or "").encode(), expected_user.encode())
        & hmac.compare_digest((auth.password or "").encode(), expected_pass.encode())
    )
    if ok:
        return None
    response, status = _error("authentication required (BASIC_AUTH_USER / BASIC_AUTH_PASS)", 401)
    response.status_code = status
    response.headers["WWW-Authenticate"] = 'Basic realm="fastsam-backend"'
    return response
