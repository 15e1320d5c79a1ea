"""``fastsam-backend worker``: RQ workers that load the models once per process.

Not RQ's default fork-per-job work horse, which would load the models again for every job and
cannot use CUDA after a fork: each process runs one ``SimpleWorker`` loop, jobs execute in it and
the models stay loaded. ``--processes N`` spawns (never forks) N such processes and restarts one
that dies.

A worker killed in the middle of a job (SIGKILL, the OOM killer, a lost machine) leaves the job in
RQ's started registry. Each worker refreshes its running job's entry every ``HEARTBEAT_S``, so the
entry goes stale ``HEARTBEAT_TTL_S`` after the process died however long the job may run. A
maintenance thread -- in one worker at a time, under a Redis lock -- cleans the registries every
``CLEANUP_S`` (a stale job goes back to its queue as one of its retries, or to the failed registry)
and enqueues retries whose backoff is due (RQ's scheduler, run in this thread instead of in a
forked process). So a job whose worker died runs again within about half a minute.

With ``WORKER_PREFETCH`` on, a worker about to run a job takes its next *warm* job too and fetches
and decodes that image in a thread while the current job runs (``prefetch.py``). The job taken
ahead sits in RQ's intermediate list of its queue, as any job between dequeue and start does, so a
worker that dies holding it leaves it to RQ's cleanup, which fails it over to a retry; one held
longer than ``AHEAD_MAX_S`` (a long current job) or held at a warm shutdown goes back to the front
of its queue instead. On a GPU a worker takes up to ``WORKER_BATCH - 1`` jobs ahead and segments
their images with the current job's in one forward pass (``batching.py``).

A Redis outage (a restart, a lost connection) does not end a worker: RQ's own loop waits while it
dequeues, and every other Redis call of the worker -- recording a job's start and end, its
heartbeats, taking ahead and giving back, the worker's own registration -- waits with backoff too
(``outage.py``), says so once, and resumes. The job in hand finishes and its end is recorded once
Redis is back; a Redis that came back empty (no persistence) gets the worker's registration again,
and the jobs it lost are enqueued again by whoever follows them (``preannotate_project.py``). A
worker exits only on a signal (during an outage, the job in hand is left to RQ's cleanup, which
retries it) or a fatal configuration error. See docs/operations.md#faults.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from typing import Any

from fastsam_backend.errors import BadRequest
from fastsam_backend.images.cloud import ImageRef
from fastsam_backend.jobs.batching import GPU_BATCH, warm_batch
from fastsam_backend.jobs.functions import install_service
from fastsam_backend.jobs.maintenance import Maintenance, give_back, utcnow
from fastsam_backend.jobs.outage import RedisWait, is_outage
from fastsam_backend.jobs.prefetch import PrefetchingLoader
from fastsam_backend.jobs.queues import JobKind, QueueConfig, connect, count
from fastsam_backend.settings import Settings, available_cores

log = logging.getLogger(__name__)

HEARTBEAT_S = 5
HEARTBEAT_TTL_S = 20
WORKER_TTL_S = 35  # RQ blocks in BLPOP for WORKER_TTL_S - 15 s between its own checks
AHEAD_MAX_S = 30  # RQ's cleanup treats a job in the intermediate list for over a minute as stuck



def _kind_of(job: Any, config: QueueConfig) -> JobKind:
    return next((k for k in JobKind if job.origin == config.queue_name(k)), JobKind.WARM)


def make_worker(config: QueueConfig, queue_names: list[str], connection: Any, name: str | None = None,
                prefetch: Any = None, batch: int = 1, warm_batch: Any = None) -> Any:
    """A ``FastSAMWorker`` on ``queue_names`` (built here so that ``rq`` is imported only when needed).

    ``prefetch(url)``, when given, is called with the URL of each warm job taken ahead: the next
    one, or the next ``batch - 1`` when ``warm_batch(urls)`` is given too, which is called with the
    URLs of a warm job and of those taken ahead before that job runs (``batching.py``)."""
    depth = max(1, batch - 1) if warm_batch is not None else 1
    from rq import Queue, SimpleWorker, worker_registration
    from rq.exceptions import StopRequested
    from rq.serializers import JSONSerializer
    from rq.utils import get_version
    from rq.worker import WorkerStatus

    class FastSAMWorker(SimpleWorker):
        """SimpleWorker + a heartbeat for the running job, the retry policy and outcome counters."""

        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            return HEARTBEAT_TTL_S  # kept fresh by _beat while the job runs (RQ: the job timeout + 60 s)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.ahead: list[tuple[Any, Any, float]] = []  # (job, queue, monotonic time taken), next first
            self.started_ahead: str | None = None
            self.redis_wait = RedisWait(stopping=lambda: self._stop_requested)
            self.torn_down = False  # unregistered: the maintenance thread must not register it again

        def wait(self, fn: Any, *args: Any, what: str, **kwargs: Any) -> Any:
            """``fn(...)``, waiting out a Redis outage (for as long as it lasts, or until told to stop)."""
            return self.redis_wait.call(fn, *args, what=what, **kwargs)

        # RQ's loop retries its dequeue on connection errors, but any other Redis error that reaches
        # it ends the worker ("found an unhandled exception, quitting"): each Redis use RQ makes
        # outside the dequeue is wrapped here so that it waits instead
        def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
            if pipeline is not None:
                return super().heartbeat(timeout, pipeline)
            self.wait(super().heartbeat, timeout, what="sending the worker's heartbeat")
            self.wait(self.ensure_registered, what="registering the worker")

        def ensure_registered(self) -> None:
            """Registered again after a Redis that restarted empty, so that ``Worker.all`` (the
            followers' "is anyone listening" and ``/metrics``) sees this worker."""
            if self.birth_date is None or self.torn_down or \
                    self.connection.sismember(self.redis_workers_keys, self.key):
                return  # not started yet (RQ registers it then), or registered
            log.warning("worker %s: registering again (Redis lost its registration)", self.name)
            with self.connection.pipeline() as pipe:
                pipe.hset(self.key, mapping=self.serialize())
                worker_registration.register(self, pipe)
                pipe.expire(self.key, self.worker_ttl + 60)
                pipe.execute()

        def beat_alive(self) -> None:
            """The worker's own heartbeat, from the maintenance thread, so that a follower can tell a
            live worker (idle in a long BLPOP, or busy) from a killed one within seconds."""
            if self.birth_date is not None and not self.torn_down:
                super().heartbeat()

        def teardown(self) -> None:
            self.torn_down = True
            try:
                super().teardown()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # stopping while Redis is away: the registration expires by itself (WORKER_TTL_S)
                log.warning("worker %s: stopped without unregistering (Redis unreachable)", self.name)

        def check_for_suspension(self, burst: bool) -> None:
            self.wait(super().check_for_suspension, burst, what="checking for a suspension")

        def run_maintenance_tasks(self) -> None:
            self.wait(super().run_maintenance_tasks, what="RQ's maintenance")

        def set_state(self, state: Any, pipeline: Any = None) -> None:
            if pipeline is not None:
                return super().set_state(state, pipeline)
            self.wait(super().set_state, state, what="recording the worker's state")

        def _finalize_success(self, job: Any, queue: Any, execution: Any, return_value: Any) -> None:
            self.wait(super()._finalize_success, job, queue, execution, return_value,
                      what=f"recording job {job.id} as done")

        def _finalize_failure(self, job: Any, queue: Any, execution: Any, exc_info: Any) -> None:
            self.wait(super()._finalize_failure, job, queue, execution, exc_info,
                      what=f"recording the failure of job {job.id}")

        def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
            while self.ahead:
                job, queue, taken = self.ahead.pop(0)
                if time.monotonic() - taken <= AHEAD_MAX_S:
                    self.started_ahead = job.id
                    return job, queue
                self.give_back(job, queue)
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

        def take_ahead(self) -> None:
            """The next warm jobs, up to ``depth`` held, non-blocking (one queue: RQ moves each to
            that queue's intermediate list)."""
            warm = [q for q in self.queues if q.name == config.queue_name(JobKind.WARM)]
            if prefetch is None or self._stop_requested or not warm \
                    or get_version(self.connection) < (6, 2, 0):  # older: no LMOVE, a dead holder would lose it
                return
            try:
                while len(self.ahead) < depth:
                    found = Queue.dequeue_any(warm, None, connection=self.connection, job_class=self.job_class,
                                              serializer=self.serializer,
                                              death_penalty_class=self.death_penalty_class)
                    if found is None:
                        return
                    self.ahead.append((*found, time.monotonic()))
                    self.connection.set(config.ahead_key(found[0].id), self.name, ex=AHEAD_MAX_S + 30)
                    prefetch(job_image(found[0].args))
            except Exception as exc:  # the job stays where it is; prefetching is only an optimisation
                log.warning("could not take the next job ahead: %s", exc)

        def give_back(self, job: Any, queue: Any) -> None:
            self.wait(give_back, queue, job.id, what=f"giving job {job.id} back to its queue")
            self.wait(self.connection.delete, config.ahead_key(job.id), what="giving a job back")

        def give_back_ahead(self) -> None:
            held, self.ahead = self.ahead, []
            for job, queue, _ in reversed(held):  # each to the front: the next one ends up first
                self.give_back(job, queue)

        def execute_job(self, job: Any, queue: Any) -> None:
            try:
                self._execute_job(job, queue)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # only when asked to stop during an outage: the job stays in the started registry (or
                # its intermediate list), where RQ's cleanup finds it once Redis answers and retries it
                log.warning("worker %s: stopping during a Redis outage; job %s is left to be retried", self.name,
                            job.id)
                raise StopRequested() from None

        def _execute_job(self, job: Any, queue: Any) -> None:
            self.take_ahead()
            execution = self.wait(self.prepare_execution, job, what=f"recording the start of job {job.id}")
            if self.started_ahead == job.id:  # started: RQ's started registry covers it now
                self.started_ahead = None
                self.wait(self._forget_ahead, job, queue, what=f"starting job {job.id}")
            self.wait(self.connection.set, config.running_key(job.id), self.name, ex=HEARTBEAT_TTL_S,
                      what=f"starting job {job.id}")
            done = threading.Event()
            beat = threading.Thread(target=self._beat, args=(job, execution, done), name="rq-heartbeat", daemon=True)
            beat.start()
            try:
                if warm_batch is not None and self.ahead and _kind_of(job, config) is JobKind.WARM:
                    self.run_batch(job)
                self.perform_job(job, queue, execution)
            finally:
                done.set()
                beat.join(HEARTBEAT_S + 5)
            self.wait(self.connection.delete, config.running_key(job.id), what=f"ending job {job.id}")
            self.set_state(WorkerStatus.IDLE)

        def _forget_ahead(self, job: Any, queue: Any) -> None:
            with self.connection.pipeline() as pipe:
                pipe.lrem(queue.intermediate_queue.key, 1, job.id)  # RQ leaves it there with 2+ queues
                pipe.delete(config.ahead_key(job.id))
                pipe.execute()

        def run_batch(self, job: Any) -> None:
            urls = [job_image(job.args), *(job_image(ahead.args) for ahead, _, _ in self.ahead)]
            try:
                warm_batch(urls)
            except Exception as exc:  # each job still does its own work and reports its own error
                log.warning("batch of %d warm jobs failed: %s", len(urls), exc)

        def _beat(self, job: Any, execution: Any, done: threading.Event) -> None:
            failing = False
            while not done.wait(HEARTBEAT_S):
                try:
                    self.maintain_heartbeats(job, execution)
                    self.connection.set(config.running_key(job.id), self.name, ex=HEARTBEAT_TTL_S)
                    self.ensure_registered()
                    failing = False
                except Exception as exc:  # Redis away for a moment: the next beat tries again (said once)
                    (log.debug if failing else log.warning)("heartbeat of job %s failed: %s", job.id, exc)
                    failing = True

        def clean_registries(self) -> None:
            self.last_cleaned_at = utcnow()  # the maintenance thread cleans, under its own lock

    def on_failure(job: Any, exc_type: Any, exc_value: BaseException | None, tb: Any) -> bool:
        from rq.exceptions import AbandonedJobError

        kind = _kind_of(job, config)
        if isinstance(exc_value, BadRequest):
            job.retries_left = 0  # the task itself is wrong (or the worker is misconfigured): no retry helps
        if isinstance(exc_value, AbandonedJobError):
            count(connection, config, kind, "abandoned")
        count(connection, config, kind, "retried" if job.should_retry else "failed")
        return True

    queues = [Queue(n, connection=connection, serializer=JSONSerializer) for n in queue_names]
    worker = FastSAMWorker(queues, connection=connection, serializer=JSONSerializer, worker_ttl=WORKER_TTL_S,
                           name=name or f"fastsam-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                           exception_handlers=[on_failure], disable_default_exception_handler=False)
    worker.fastsam_on_failure = on_failure
    return worker


def run_worker(settings: Settings, queue_names: list[str], *, burst: bool = False) -> None:
    """One worker process: build the service, load its models, then take jobs until told to stop."""
    from fastsam_backend.service.orchestrator import build_service

    config = QueueConfig.from_settings(settings)
    if config is None:
        raise SystemExit("the worker needs REDIS_URL (or QUEUE_REDIS_URL): the queues live in Redis")
    service = build_service(settings)
    started = time.perf_counter()
    service.segmenter.load()  # once per process; a missing checkpoint fails here, not on every job
    if service.clip is not None:
        service.models.zero_shot_unavailable()  # loads CLIP when it can (logs why not, once)
    log.info("worker %d: models loaded in %.1f s; model_version %s; queues %s", os.getpid(),
             time.perf_counter() - started, service.model_version, ", ".join(queue_names))
    install_service(service)
    connection = connect(config.redis_url, timeout_s=WORKER_TTL_S)
    # a worker started while Redis restarts (compose starts both at once) waits for it
    RedisWait().call(connection.ping, what="connecting to the queues' Redis")
    batch = settings.worker_batch or (GPU_BATCH if service.segmenter.batches else 1)
    loader = None
    if settings.worker_prefetch or batch > 1:
        loader = service.images = PrefetchingLoader(service.images, depth=max(2, batch))
    worker = make_worker(config, queue_names, connection,
                         prefetch=(lambda url: _prefetch_uncached(service, loader, url)) if loader else None,
                         batch=batch,
                         warm_batch=(lambda urls: warm_batch(service, urls, batch)) if batch > 1 else None)
    if batch > 1:
        log.info("worker %d: warm jobs in batches of up to %d images", os.getpid(), batch)
    maintenance = Maintenance(worker, config, beat_s=HEARTBEAT_S)
    maintenance.start()
    try:
        worker.work(burst=burst, with_scheduler=False, logging_level=settings.log_level.upper(),
                    max_jobs=None)
    finally:
        maintenance.stopped.set()
        worker.give_back_ahead()
        if loader is not None:
            log.info("worker %d: %d images came from a prefetch", os.getpid(), loader.taken)
            loader.close()


def job_image(args: Any) -> ImageRef:
    """A warm job's image from its arguments: ``(url, task_id)``, or ``(url,)`` as queued before task ids."""
    return ImageRef.of(args[0], args[1] if len(args) > 1 else None)


def _prefetch_uncached(service: Any, loader: PrefetchingLoader, ref: Any) -> None:
    if isinstance(ref, ImageRef) and isinstance(ref.url, str) and service.image_key_if_cached(ref) is None:
        loader.prefetch(ref)


def _child(overrides: dict[str, Any], queue_names: list[str], burst: bool) -> None:
    from fastsam_backend.logs import configure_logging
    from fastsam_backend.settings import load_settings

    os.setpgrp()  # Ctrl-C reaches the supervisor only, which passes one SIGTERM on (a second would be a cold stop)
    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    run_worker(settings, queue_names, burst=burst)


def supervise(overrides: dict[str, Any], queue_names: list[str], processes: int, *, burst: bool = False) -> int:
    """``processes`` spawned worker processes; one that dies is restarted (after a pause) until
    SIGTERM/SIGINT, which is passed on to all of them (RQ's warm shutdown: the job in hand ends)."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or torch threads
    if "torch_threads" not in overrides:
        overrides = {**overrides, "torch_threads": max(1, available_cores() // processes)}
    stopping = threading.Event()

    def start(i: int) -> Any:
        proc = ctx.Process(target=_child, args=(overrides, queue_names, burst), name=f"fastsam-worker-{i}")
        proc.start()
        return proc

    def stop(signum: int, frame: Any) -> None:
        stopping.set()
        for proc in procs:
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)

    procs = [start(i) for i in range(processes)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        for i, proc in enumerate(procs):
            proc.join(timeout=0.5)
            if proc.is_alive():
                continue
            if stopping.is_set() or (burst and proc.exitcode == 0):
                continue
            log.warning("worker process %s exited with %s; restarting it in 5 s", proc.pid, proc.exitcode)
            time.sleep(5)
            if not stopping.is_set():
                procs[i] = start(i)
        if all(not p.is_alive() for p in procs) and (stopping.is_set() or burst):
            return 0 if all(p.exitcode == 0 for p in procs) else 1
