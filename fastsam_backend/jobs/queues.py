"""The job queues on the cache's Redis (RQ): where they live, how jobs are enqueued once, their states.

Four job kinds (``JobKind``), each a queue ``<QUEUE_PREFIX><kind>`` with RQ's JSON serializer
(nothing is pickled, as everywhere else). ``JobQueues.enqueue`` uses RQ's atomic ``unique``
enqueue: the same job id enqueued twice while it is queued, scheduled or running runs once; a
finished or failed job of that id is replaced, so warming again after an eviction works. What the
jobs do is in ``functions.py``; which ids and arguments each kind gets, in ``enqueue.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from fastsam_backend.errors import BadRequest

if TYPE_CHECKING:
    import redis

    from fastsam_backend.settings import Settings

log = logging.getLogger(__name__)

ACTIVE = frozenset({"queued", "started", "scheduled", "deferred"})  # RQ JobStatus values still to run
DONE = frozenset({"finished"})
FAILED = frozenset({"failed", "stopped", "canceled"})
LIVE_S = 15.0  # a worker whose heartbeat is older is taken for dead (it beats every 5 s: worker.py)


class JobKind(str, Enum):
    WARM = "warm"
    PREANNOTATE = "preannotate"
    TRAIN = "train"  # fine-tune FastSAM on a project's masks (train.py)
    LEARN = "learn"  # an annotation webhook's label examples (learn.py)


class JobRefused(BadRequest):
    """A job that cannot succeed however often it is tried (never retried)."""


@dataclass(frozen=True)
class QueueConfig:
    """Where the queues live and how jobs are run; from ``Settings`` (``QUEUE_*``, ``JOB_*``)."""

    redis_url: str
    prefix: str = "fastsam-"
    timeout_s: int = 60
    retries: int = 3
    retry_intervals: tuple[int, ...] = (5, 30, 120)
    result_ttl_s: int = 3600
    failure_ttl_s: int = 7 * 24 * 3600  # failures stay visible (RQ's failed registry) for a week

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueConfig | None:
        """None without Redis: the queues need a shared one (there is no in-process queue)."""
        url = settings.queue_redis_url or settings.redis_url
        if not url:
            return None
        intervals = tuple(int(v) for v in settings.job_retry_intervals.split(","))
        return cls(url, settings.queue_prefix, settings.job_timeout_s, settings.job_retries, intervals,
                   settings.job_result_ttl_s)

    def queue_name(self, kind: JobKind) -> str:
        return f"{self.prefix}{kind.value}"

    @property
    def queue_names(self) -> list[str]:
        return [self.queue_name(k) for k in JobKind]

    @property
    def stats_key(self) -> str:
        """A hash of outcome counters (``warm:computed`` ...), summed over every worker anywhere."""
        return f"{self.prefix}jobs:stats"

    @property
    def maintenance_key(self) -> str:
        return f"{self.prefix}jobs:maintenance"

    def running_key(self, job_id: str) -> str:
        """Set while a worker runs ``job_id`` (refreshed with its heartbeat, set again after a Redis that
        restarted empty): a follower never enqueues again a job that is still running (``follow.py``)."""
        return f"{self.prefix}jobs:running:{job_id}"

    def ahead_key(self, job_id: str) -> str:
        """Set while a worker holds ``job_id`` taken ahead of its current job (``worker.py``)."""
        return f"{self.prefix}jobs:ahead:{job_id}"


def connect(url: str, timeout_s: float = 10.0, connect_timeout_s: float = 2.0, retry: bool = True) -> redis.Redis:
    """A client for RQ (bytes, not decoded). Workers raise the socket timeout above their BLPOP.
    ``retry=False`` turns off redis-py's own retries (for answers that must come within a second)."""
    import redis

    extra: dict[str, Any] = {}
    if not retry:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        extra["retry"] = Retry(NoBackoff(), 0)
    return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s,
                                health_check_interval=30, **extra)


@dataclass(frozen=True)
class JobState:
    """One job as a follower sees it: RQ's status (None once it expired) and why it failed."""

    job_id: str
    status: str | None
    reason: str | None = None
    result: dict[str, Any] | None = None


class JobQueues:
    """The queues of both kinds on one Redis, with RQ's JSON serializer."""

    def __init__(self, config: QueueConfig, connection: redis.Redis | None = None) -> None:
        from rq import Queue
        from rq.serializers import JSONSerializer

        self.config = config
        self.connection = connection or connect(config.redis_url)
        self.serializer = JSONSerializer
        self.queues = {kind: Queue(config.queue_name(kind), connection=self.connection, serializer=JSONSerializer,
                                   default_timeout=config.timeout_s) for kind in JobKind}

    def enqueue(self, kind: JobKind, func: str, args: list[Any], job_id: str, description: str,
                timeout_s: int | None = None, once: bool = False) -> bool:
        """True: a new job; False: a job of this id is queued, scheduled or running already, or with
        ``once``, finished too (kept ``JOB_RESULT_TTL_S``: the same event delivered again is not redone)."""
        from rq import Retry
        from rq.exceptions import DuplicateJobError
        from rq.job import Job

        cfg = self.config
        retry = Retry(max=cfg.retries, interval=list(cfg.retry_intervals)) if cfg.retries else None
        for _ in range(3):  # bounded: each pass either enqueues, finds an active job, or removes a dead one
            try:
                self.queues[kind].enqueue(func, *args, job_id=job_id, unique=True, retry=retry,
                                          job_timeout=timeout_s or cfg.timeout_s, result_ttl=cfg.result_ttl_s,
                                          failure_ttl=cfg.failure_ttl_s, description=description)
                return True
            except DuplicateJobError:
                job = Job.fetch_many([job_id], connection=self.connection, serializer=self.serializer)[0]
                if job is None:
                    continue  # it expired in between
                if job.get_status(refresh=False).value in (ACTIVE | DONE if once else ACTIVE):
                    return False
                job.delete()  # finished or failed earlier: this is a new request for the work
        return False

    def remove_queued(self, kind: JobKind, job_ids: list[str]) -> int:
        """Deletes those of ``job_ids`` still waiting in ``kind``'s queue (not those running), so that
        enqueueing them later is a new job, not a duplicate of one in no list."""
        removed = 0
        for job_id in job_ids:
            if self.queues[kind].remove(job_id):
                job = self._fetch_or_none(job_id)
                if job is not None:
                    job.delete()
                removed += 1
        return removed

    def live_workers(self, kind: JobKind) -> int:
        """Workers listening on ``kind``'s queue (``live_workers``)."""
        name = self.config.queue_name(kind)
        return live_workers(self.connection, [name])[name]

    def running(self, job_ids: list[str]) -> set[str]:
        """Those of ``job_ids`` a live worker says it is running (``QueueConfig.running_key``)."""
        if not job_ids:
            return set()
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(self.config.running_key(job_id))
            return {job_id for job_id, found in zip(job_ids, pipe.execute()) if found}

    def states(self, job_ids: list[str]) -> list[JobState]:
        """Current state of each job (one round trip per 500 ids)."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        out: list[JobState] = []
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            try:
                jobs = Job.fetch_many(chunk, connection=self.connection, serializer=self.serializer)
            except NoSuchJobError:  # a half-written job hash (a heartbeat racing a Redis restart): one by one
                jobs = [self._fetch_or_none(job_id) for job_id in chunk]
            for job_id, job in zip(chunk, jobs):
                if job is None:
                    out.append(JobState(job_id, None))
                    continue
                status = job.get_status(refresh=False).value
                reason = result = None
                if status in FAILED:
                    reason = _failure_reason(job)
                elif status in DONE:
                    value = job.return_value(refresh=False)
                    result = value if isinstance(value, dict) else None
                out.append(JobState(job_id, status, reason, result))
        return out

    def _fetch_or_none(self, job_id: str) -> Any:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            return Job.fetch(job_id, connection=self.connection, serializer=self.serializer)
        except NoSuchJobError:
            return None


def live_workers(connection: Any, queue_names: list[str]) -> dict[str, int]:
    """Workers registered on each queue with a heartbeat in the last ``LIVE_S`` (each worker beats
    every few seconds, busy or idle: ``worker.py``), so a killed one drops out within ``LIVE_S``,
    while RQ's own sets and its worker keys keep it for minutes. Two round trips."""
    import time

    from rq import worker_registration
    from rq.utils import utcparse

    with connection.pipeline(transaction=False) as pipe:
        for name in queue_names:
            pipe.smembers(worker_registration.WORKERS_BY_QUEUE_KEY % name)
        members = pipe.execute()
    keys = sorted({key for found in members for key in found})
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hget(key, "last_heartbeat")
        beats = pipe.execute()
    alive = set()
    for key, beat in zip(keys, beats):
        try:
            if beat and time.time() - utcparse(beat.decode()).timestamp() < LIVE_S:
                alive.add(key)
        except ValueError:  # a foreign format: not ours to judge
            alive.add(key)
    return {name: len(found & alive) for name, found in zip(queue_names, members)}


def _failure_reason(job: Any) -> str:
    """The last line of the job's traceback (``ImageError: could not fetch ...``), not the whole of it."""
    try:
        text = (job.latest_result().exc_string or "") if job.latest_result() is not None else ""
    except Exception:  # an old or foreign result format: the status still says it failed
        text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "failed (no traceback recorded: abandoned or out of retries)"


def count(connection: Any, config: QueueConfig | str, kind: JobKind, outcome: str, n: int = 1) -> None:
    """Best effort: a counter lost to a Redis hiccup must not fail the job it counts."""
    key = config.stats_key if isinstance(config, QueueConfig) else config
    try:
        connection.hincrby(key, f"{kind.value}:{outcome}", n)
    except Exception as exc:  # redis errors, a closed connection
        log.debug("could not count %s %s: %s", kind.value, outcome, exc)
