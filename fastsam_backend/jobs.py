"""Background work on RQ over the cache's Redis: warm an image, pre-annotate a task.

Two job kinds, each a module-level function taking JSON-able arguments (RQ's JSON serializer:
nothing is pickled, as everywhere else) that calls this process's one ``FastSAMService`` -- the
object the HTTP layer calls, built once per worker process (``worker.py``), so the models load
once per process and never per job:

- ``warm_image(url)``: the image's masks (and its CLIP crop embeddings when CLIP is configured)
  into the cache, through the same ``MaskStore``. Its cross-process lock makes an interactive click
  on an image whose warm job is *running* wait for that work, and at run time an image that is
  cached already (under any URL: the key is the bytes' digest) costs a lookup.
- ``preannotate_task(task_id, project_id, model_version)``: the task fetched from Label Studio,
  predicted as ``/predict`` predicts it, the prediction written back under that version
  (``preannotate.py``).

Job ids come from what the enqueuer knows (the URL and the model identity; the task and the
``model_version``), and RQ's atomic ``unique`` enqueue refuses a second job of an id that exists:
the same work enqueued twice while it is queued, scheduled or running runs once. A finished or
failed job of that id is replaced, so warming again after an eviction works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .errors import BadRequest

if TYPE_CHECKING:
    import redis

    from .service import FastSAMService
    from .settings import Settings

log = logging.getLogger(__name__)

WARM_FUNC = "fastsam_backend.jobs.warm_image"
PREANNOTATE_FUNC = "fastsam_backend.jobs.preannotate_task"
ACTIVE = frozenset({"queued", "started", "scheduled", "deferred"})  # RQ JobStatus values still to run
DONE = frozenset({"finished"})
FAILED = frozenset({"failed", "stopped", "canceled"})


class JobKind(str, Enum):
    WARM = "warm"
    PREANNOTATE = "preannotate"
    TRAIN = "train"  # fine-tune FastSAM on a project's masks (finetune_job.py)
    LEARN = "learn"  # an annotation webhook's label examples (learn_jobs.py)


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

    def ahead_key(self, job_id: str) -> str:
        """Set while a worker holds ``job_id`` taken ahead of its current job (``worker.py``)."""
        return f"{self.prefix}jobs:ahead:{job_id}"


def connect(url: str, timeout_s: float = 10.0) -> redis.Redis:
    """A client for RQ (bytes, not decoded). Workers raise the socket timeout above their BLPOP."""
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=timeout_s, health_check_interval=30)


# ------------------------------------------------------------------------------------------ ids
def _digest(*parts: Any) -> str:
    canon = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def model_key(service: FastSAMService) -> list[Any]:
    """What a warm job's result depends on besides the image: the checkpoint, the inference
    parameters and, when configured, CLIP (its crop embeddings are warmed too)."""
    clip = service.clip.identity if service.clip is not None else None
    return [service.segmenter.identity, service.settings.inference_params(), clip]


def warm_job_id(config: QueueConfig, url: str, model: list[Any]) -> str:
    return f"{config.prefix}warm-{_digest(url, model)[:32]}"


def preannotate_job_id(config: QueueConfig, ls_url: str, task_id: int, model_version: str) -> str:
    return f"{config.prefix}pre-{task_id}-{_digest(ls_url.rstrip('/'), task_id, model_version)[:16]}"


# -------------------------------------------------------------------------------------- enqueue
@dataclass
class Enqueued:
    """What an enqueue call did; ``job_ids`` are every job the caller may follow (new or already there)."""

    enqueued: int = 0
    duplicate: int = 0  # the same job was queued, scheduled or running already
    cached: int = 0  # warm: the image is in the cache already, no job
    job_ids: list[str] = field(default_factory=list)

    def add(self, other: Enqueued) -> None:
        self.enqueued += other.enqueued
        self.duplicate += other.duplicate
        self.cached += other.cached
        self.job_ids += other.job_ids


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

    def states(self, job_ids: list[str]) -> list[JobState]:
        """Current state of each job (one round trip per 500 ids)."""
        from rq.job import Job

        out: list[JobState] = []
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            jobs = Job.fetch_many(chunk, connection=self.connection, serializer=self.serializer)
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


def _failure_reason(job: Any) -> str:
    """The last line of the job's traceback (``ImageError: could not fetch ...``), not the whole of it."""
    try:
        text = (job.latest_result().exc_string or "") if job.latest_result() is not None else ""
    except Exception:  # an old or foreign result format: the status still says it failed
        text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "failed (no traceback recorded: abandoned or out of retries)"


def enqueue_warm(queues: JobQueues, service: FastSAMService, urls: list[str]) -> Enqueued:
    """Warm jobs for ``urls``, skipping images whose masks are cached already (a key lookup each)."""
    report, model = Enqueued(), model_key(service)
    for url in urls:
        if service.image_key_if_cached(url) is not None:
            report.cached += 1
            continue
        job_id = warm_job_id(queues.config, url, model)
        # the description is what RQ shows and logs: never the URL, whose query may be a signature
        new = queues.enqueue(JobKind.WARM, WARM_FUNC, [url], job_id, f"warm image {job_id[-12:]}")
        report.enqueued += new
        report.duplicate += not new
        report.job_ids.append(job_id)
    return report


def enqueue_preannotate(queues: JobQueues, ls_url: str, project_id: int, task_ids: list[int],
                        model_version: str) -> Enqueued:
    report = Enqueued()
    for task_id in task_ids:
        job_id = preannotate_job_id(queues.config, ls_url, task_id, model_version)
        new = queues.enqueue(JobKind.PREANNOTATE, PREANNOTATE_FUNC, [task_id, project_id, model_version], job_id,
                             f"pre-annotate task {task_id}")
        report.enqueued += new
        report.duplicate += not new
        report.job_ids.append(job_id)
    return report


# ------------------------------------------------------------------------------- job functions
_PROCESS: dict[str, Any] = {}


def install_service(service: FastSAMService) -> None:
    """The worker process's service (``worker.py`` builds and loads it before the first job)."""
    _PROCESS["service"] = service


def process_service() -> FastSAMService:
    """This process's service; built here once if no worker installed one (e.g. a plain ``rq worker``)."""
    service = _PROCESS.get("service")
    if service is None:
        from .service import build_service
        from .settings import load_settings

        service = _PROCESS["service"] = build_service(load_settings(batch_time_budget_s=0))
    return service


def count(connection: Any, config: QueueConfig | str, kind: JobKind, outcome: str, n: int = 1) -> None:
    """Best effort: a counter lost to a Redis hiccup must not fail the job it counts."""
    key = config.stats_key if isinstance(config, QueueConfig) else config
    try:
        connection.hincrby(key, f"{kind.value}:{outcome}", n)
    except Exception as exc:  # redis errors, a closed connection
        log.debug("could not count %s %s: %s", kind.value, outcome, exc)


def _job_connection() -> Any:
    from rq import get_current_job

    job = get_current_job()
    return job.connection if job is not None else None


def _stats_key(service: FastSAMService) -> str:
    return f"{service.settings.queue_prefix}jobs:stats"


def warm_image(url: str) -> dict[str, Any]:
    """Masks (and CLIP crop embeddings, when CLIP can load) of the image at ``url`` into the cache
    (where a worker's batch put them already, a lookup; ``batching.py``)."""
    from . import batching

    service = process_service()
    started = time.perf_counter()
    found = service.masks_for(url)
    embeddings = False
    if service.clip is not None and service.models.zero_shot_unavailable() is None:
        service.crop_embeddings(found)
        embeddings = True
    outcome = "computed" if found.computed or batching.claim(found.key) else "cached"
    if (connection := _job_connection()) is not None:
        count(connection, _stats_key(service), JobKind.WARM, outcome)
    return {"outcome": outcome, "digest": found.key.digest, "instances": len(found.masks),
            "embeddings": embeddings, "seconds": round(time.perf_counter() - started, 3)}


def preannotate_task(task_id: int, project_id: int, model_version: str) -> dict[str, Any]:
    """The task's prediction written to Label Studio (``LABEL_STUDIO_URL``/``_API_KEY`` of this worker)."""
    from .preannotate import project_client, write_one

    service = process_service()
    # the settings must agree; the learned labels or a newly adopted checkpoint may have moved on
    # since the enqueue (their +tags), and the prediction is written under the job's version
    version = service.version_for(service.options_for(str(project_id)))
    if not model_version.startswith(version):
        raise JobRefused(f"this worker predicts as model_version {version}, the job asks for {model_version}: "
                         "run the workers with the enqueuer's settings (weights, IMGSZ, CONF, ...)")
    outcome = write_one(service, project_client(service.settings, project_id), task_id, model_version)
    if (connection := _job_connection()) is not None:
        count(connection, _stats_key(service), JobKind.PREANNOTATE, outcome)
    return {"outcome": outcome, "task": task_id}


# ------------------------------------------------------------------------------------- metrics
class JobsCollector:
    """Prometheus collector: the queues' state read from RQ's registries at scrape time, so
    ``/metrics`` of any replica shows every worker's work (jobs in Redis, not in this process)."""

    def __init__(self, config: QueueConfig) -> None:
        self.config = config
        self._connection: Any = None

    def collect(self):  # prometheus_client's collector protocol
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from rq import Queue
        from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
        from rq.worker import Worker

        jobs = GaugeMetricFamily("fastsam_jobs", "Background jobs per queue and state (RQ registries; finished "
                                 "and failed ones are kept JOB_RESULT_TTL_S and a week)", labels=["queue", "state"])
        outcomes = CounterMetricFamily("fastsam_job_outcomes", "Background job outcomes, all workers "
                                       "(computed/cached/written/skipped, retried, abandoned, failed)",
                                       labels=["kind", "outcome"])
        up = GaugeMetricFamily("fastsam_jobs_redis_up", "Whether the queues' Redis answered this scrape")
        workers = GaugeMetricFamily("fastsam_job_workers", "RQ workers registered (alive) on the queues' Redis")
        try:
            if self._connection is None:
                self._connection = connect(self.config.redis_url, timeout_s=1.0)
            conn, now = self._connection, time.time()
            names = self.config.queue_names
            with conn.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.llen(Queue(name, connection=conn).key)
                    pipe.zcard(StartedJobRegistry(name, connection=conn).key)
                    pipe.zcard(ScheduledJobRegistry(name, connection=conn).key)
                    pipe.zcount(FinishedJobRegistry(name, connection=conn).key, now, "+inf")
                    pipe.zcount(FailedJobRegistry(name, connection=conn).key, now, "+inf")
                pipe.hgetall(self.config.stats_key)
                pipe.scard(Worker.redis_workers_keys)
                results = pipe.execute()
        except Exception as exc:  # /metrics must answer whatever Redis does
            log.debug("job metrics unavailable: %s", exc)
            up.add_metric([], 0)
            return [up]
        for i, name in enumerate(names):
            for state, value in zip(("queued", "started", "scheduled", "finished", "failed"), results[5 * i:5 * i + 5]):
                jobs.add_metric([name, state], float(value))
        for raw, value in sorted(results[-2].items()):
            kind, _, outcome = raw.decode().partition(":")
            outcomes.add_metric([kind, outcome], float(value))
        up.add_metric([], 1)
        workers.add_metric([], float(results[-1]))
        return [jobs, outcomes, up, workers]


# ------------------------------------------------------------------------------------- webhook
def warm_new_tasks(queues: JobQueues, service: FastSAMService, body: dict[str, Any]) -> dict[str, Any]:
    """Label Studio's ``TASKS_CREATED`` webhook: a warm job for each new task's image.

    The payload is ``{"action": "TASKS_CREATED", "tasks": [{"id", "data", ...}], "project": {"id",
    "label_config", ...}}``; the image is ``data[<key>]`` of the label config's ``<Image value="$key">``
    (the project's, else the one ``/setup`` saw, else ``image``).
    """
    from .labelconfig import parse_label_config

    project = body.get("project") if isinstance(body.get("project"), dict) else {}
    label_config = project.get("label_config") or service.options_for(str(project.get("id") or "")).label_config
    try:
        image_key = parse_label_config(label_config).image_key if label_config else "image"
    except BadRequest:
        image_key = "image"
    tasks = body.get("tasks") if isinstance(body.get("tasks"), list) else []
    urls = [url for t in tasks if isinstance(t, dict) and isinstance(t.get("data"), dict)
            and isinstance(url := t["data"].get(image_key), str) and url.strip()]
    report = enqueue_warm(queues, service, urls)
    return {"tasks": len(tasks), "enqueued": report.enqueued, "duplicate": report.duplicate, "cached": report.cached,
            "without_image": len(tasks) - len(urls)}
