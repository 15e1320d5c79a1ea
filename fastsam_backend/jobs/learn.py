"""Annotation webhooks learned off the request thread (issue #17).

Label Studio 1.23.2 posts a webhook once, with a 1 s timeout (``WEBHOOK_TIMEOUT`` in its settings),
and ignores the answer: a timeout or an error status is not retried (``webhooks/utils.py``
``run_webhook_sync``). Without its own Redis, Label Studio even posts it inside the annotator's save
request. Learning from an image that is not cached yet means downloading and segmenting it (seconds
on a CPU), so ``/webhook`` validates the event (a malformed body is still a 400 naming the field),
answers ``202`` with what it accepted, and learns in the background:

- with the job queues (``REDIS_URL`` / ``QUEUE_REDIS_URL``) and a worker taking ``<QUEUE_PREFIX>learn``
  (``fastsam-backend worker`` does by default): a ``learn`` job there, arguments the action and the event's JSON
  trimmed to what ``annotations.parse_event`` reads (the project's ``task_data_password`` and the
  like never reach Redis), retried on transient errors like every job;
- otherwise (no queues, or no worker on that queue: one SCARD per event asks): one thread in this
  process, ``LEARN_BACKLOG`` events queued at most. A full backlog is a 503, logged and counted in
  ``fastsam_learn_events_total{outcome="refused"}`` (Label Studio does not retry: saving the
  annotation again sends it again); the backlog is drained for up to ``DRAIN_S`` at exit.

Either way an event delivered twice (Label Studio's own ML webhook and one added by hand, or a
replay) is learned once: its key is the project, the action and each annotation's id and
``updated_at`` (a digest of the trimmed body when those are missing). Deletions are a few Redis
commands and stay in the request; they leave tombstones (``example_store``) so that a create still
queued does not bring the examples back.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from fastsam_backend.errors import BackendError
from fastsam_backend.jobs.queues import JobKind, JobQueues, JobRefused, QueueConfig
from fastsam_backend.ls.annotations import DELETED, AnnotationEvent, parse_event

if TYPE_CHECKING:
    from fastsam_backend.service.orchestrator import FastSAMService

log = logging.getLogger(__name__)

LEARN_FUNC = "fastsam_backend.jobs.learn.learn_event"
DRAIN_S = 10.0  # at exit, the in-process backlog is learned for up to this long
REMEMBERED = 4096  # event keys the in-process learner remembers (duplicates of older ones are learned again)
ANNOTATION_KEYS = ("id", "task", "result", "was_cancelled", "updated_at")
TASK_KEYS = ("id", "data")
PROJECT_KEYS = ("id", "label_config")

EVENTS = Counter("fastsam_learn_events_total", "Annotation webhook events to learn from (accepted, duplicate, "
                 "refused: backlog full; learned, failed: in this process's background thread)", ["outcome"])


def slim_event(body: dict[str, Any]) -> dict[str, Any]:
    """The webhook body with only what ``parse_event`` reads (LS sends the whole project and task)."""
    def pick(item: Any, keys: tuple[str, ...]) -> Any:
        return {k: item[k] for k in keys if k in item} if isinstance(item, dict) else item

    def each(item: Any, keys: tuple[str, ...]) -> Any:
        return [pick(x, keys) for x in item] if isinstance(item, list) else pick(item, keys)

    out = {"project": pick(body.get("project"), PROJECT_KEYS)}
    for name, keys in (("annotation", ANNOTATION_KEYS), ("task", TASK_KEYS), ("annotations", ("id",))):
        if name in body:
            out[name] = each(body[name], keys)
    return out


def event_key(project: str, action: str, body: dict[str, Any]) -> str:
    """What makes a delivery the same event: project, action, each annotation's id and ``updated_at``."""
    anns = body.get("annotation")
    anns = anns if isinstance(anns, list) else [anns]
    stamps = [(a.get("id"), a.get("updated_at")) for a in anns if isinstance(a, dict)]
    if stamps and len(stamps) == len(anns) and all(i is not None and t for i, t in stamps):
        parts: list[Any] = [project, action, stamps]
    else:
        parts = [project, action, slim_event(body)]
    canon = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def learn_job_id(config: QueueConfig, project: str, key: str) -> str:
    return f"{config.prefix}learn-{project}-{key[:24]}"


def learn_event(action: str, body: dict[str, Any]) -> dict[str, Any]:
    """The ``learn`` job: the event's examples into the project's store; the summary is its result."""
    from fastsam_backend.jobs.functions import count_outcome, process_service

    service = process_service()
    if (why := service.learner.unavailable()) is not None:
        raise JobRefused(f"this worker cannot learn labels ({why}): run it with the backend's CLIP settings")
    result = service.learner.learn(parse_event(action, body))
    count_outcome(service, JobKind.LEARN, "learned")
    return result


class LearnThread:
    """One background thread learning events in arrival order, at most ``backlog`` waiting."""

    def __init__(self, learn: Callable[[AnnotationEvent], dict[str, Any]], backlog: int,
                 drain_s: float = DRAIN_S) -> None:
        self._learn, self._drain_s = learn, drain_s
        self._queue: queue.Queue[tuple[str, AnnotationEvent]] = queue.Queue(maxsize=backlog)
        self._keys: OrderedDict[str, bool] = OrderedDict()  # event key -> learned (False: waiting or running)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.counts = {"accepted": 0, "duplicate": 0, "refused": 0, "learned": 0, "failed": 0}
        self.last: dict[str, Any] | None = None  # the last event learned here: its summary, or why it failed

    def submit(self, key: str, event: AnnotationEvent) -> bool:
        """True: queued; False: the same event is queued or was learned already. A full backlog is a 503."""
        with self._lock:
            if key in self._keys:
                self._count("duplicate")
                return False
            try:
                self._queue.put_nowait((key, event))
            except queue.Full:
                self._count("refused")
                log.warning("project %s: %s of annotations %s NOT learned: the backlog is full (LEARN_BACKLOG=%d)",
                            event.project, event.action, [a.id for a in event.annotations], self._queue.maxsize)
                raise BackendError(f"the learning backlog is full ({self._queue.maxsize} events, LEARN_BACKLOG); "
                                   "save the annotation again later", status=503) from None
            self._keys[key] = False
            while len(self._keys) > REMEMBERED:
                self._keys.popitem(last=False)
            self._count("accepted")
            if self._thread is None:  # started on first use: after gunicorn's fork, never before
                self._thread = threading.Thread(target=self._run, name="fastsam-learn", daemon=True)
                self._thread.start()
                atexit.register(self.drain, self._drain_s)
        return True

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        EVENTS.labels(outcome=outcome).inc()

    def _run(self) -> None:
        while True:
            key, event = self._queue.get()
            started = time.perf_counter()
            try:
                result = self._learn(event)
            except Exception as exc:  # a store or image failure: a redelivery (the annotation saved again) retries
                with self._lock:
                    self._keys.pop(key, None)
                    self._count("failed")
                    self.last = {"project": event.project, "action": event.action, "failed": str(exc)[:300]}
                level = logging.WARNING if isinstance(exc, BackendError) else logging.ERROR
                log.log(level, "project %s: %s of annotations %s failed in the background: %s", event.project,
                        event.action, [a.id for a in event.annotations], exc,
                        exc_info=not isinstance(exc, BackendError))
            else:
                with self._lock:
                    if key in self._keys:
                        self._keys[key] = True
                    self._count("learned")
                    self.last = {"action": event.action, **result}
                log.info("project %s: %s learned in the background in %.0f ms: %s", event.project, event.action,
                         1000 * (time.perf_counter() - started), result)
            finally:
                self._queue.task_done()

    @property
    def pending(self) -> int:
        """Events queued or being learned."""
        return self._queue.unfinished_tasks

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the backlog to be learned; True when it was."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pending:
            log.warning("%d annotation events were not learned before exit", self.pending)
        return not self.pending

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"pending": self.pending, "backlog": self._queue.maxsize,
                    **self.counts, "last": self.last}


class LearnDispatch:
    """The webhook's half of learning: validate now, learn later (a job, else this process's thread)."""

    def __init__(self, service: FastSAMService, queue_config: QueueConfig | None, backlog: int) -> None:
        self.service, self.config = service, queue_config
        self._queues: JobQueues | None = None  # no Redis connection before the first event
        self.thread = LearnThread(service.learner.learn, backlog)  # no queues, or no worker on the learn queue
        self._warned = False

    def accept(self, action: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """``(answer, status)``: 202 and what was accepted; a deletion, learned at once, 201 and its summary."""
        learner = self.service.learner
        if (why := learner.unavailable()) is not None:
            return {"status": "ok", "result": {"learned": False, "reason": why}}, 201
        event = parse_event(action, body)  # BadRequest: a 400 naming the field
        if action == DELETED:
            return {"status": "ok", "result": learner.learn(event)}, 201
        key = event_key(event.project, action, body)
        accepted: dict[str, Any] = {"project": event.project, "annotations": [a.id for a in event.annotations]}
        if self._workers_listening():
            accepted.update(background="job", **self._enqueue(action, body, event, key))
        else:
            new = self.thread.submit(key, event)
            accepted.update(background="thread", duplicate=not new, pending=self.thread.pending)
        return {"status": "accepted", "result": accepted}, 202

    def _workers_listening(self) -> bool:
        """Whether a ``worker`` takes the learn queue (one SCARD). Without one a job would wait for
        ever: the queues may be there only for warming (REDIS_URL set for the cache)."""
        if self.config is None:
            return False
        from redis import RedisError
        from rq import Worker

        try:
            queues = self._job_queues()
            listening = Worker.count(connection=queues.connection, queue=queues.queues[JobKind.LEARN]) > 0
        except RedisError as exc:
            raise BackendError(f"could not reach the job queues: Redis failed ({type(exc).__name__})",
                               status=503) from None
        if not listening and not self._warned:
            self._warned = True
            log.warning("no worker takes %s: annotation events are learned in this process's background thread",
                        self.config.queue_name(JobKind.LEARN))
        return listening

    def _job_queues(self) -> JobQueues:
        assert self.config is not None
        if self._queues is None:
            self._queues = JobQueues(self.config)
        return self._queues

    def _enqueue(self, action: str, body: dict[str, Any], event: AnnotationEvent, key: str) -> dict[str, Any]:
        from redis import RedisError

        assert self.config is not None
        job_id = learn_job_id(self.config, event.project, key)
        try:
            new = self._job_queues().enqueue(JobKind.LEARN, LEARN_FUNC, [action, slim_event(body)], job_id,
                                             f"learn project {event.project} annotations "
                                             f"{','.join(a.id for a in event.annotations)[:80]}", once=True)
        except RedisError as exc:
            EVENTS.labels(outcome="refused").inc()
            raise BackendError(f"could not enqueue the learn job: Redis failed ({type(exc).__name__})",
                               status=503) from None
        EVENTS.labels(outcome="accepted" if new else "duplicate").inc()
        return {"job_id": job_id, "duplicate": not new}

    def health(self) -> dict[str, Any]:
        """``/health``'s ``learning``: this process's thread (backlog, counts, last result) and the job queue."""
        out = self.thread.health()
        if self.config is not None:
            out["queue"] = self.config.queue_name(JobKind.LEARN)  # events go there while a worker takes it
        return out
