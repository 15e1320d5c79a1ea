"""Pre-annotating a whole Label Studio project: in this process, or on the workers' queue.

Both walk the project's tasks (``ls.project.ProjectClient``), skip every task that already holds a
prediction of this ``model_version`` -- so a run stopped by Ctrl-C or a crash resumes where it was,
without duplicates -- and end with a ``Summary`` (done, skipped, failed with reasons). In this
process, tasks are predicted in batches by ``FastSAMService.predict``, exactly what ``/predict``
runs for Label Studio's "Retrieve predictions", and written back one by one. With the queue, each
task becomes a *pre-annotate* job (``jobs.preannotate_task``) and the run follows the jobs.

Ctrl-C (SIGINT) asks for a stop: the batch in hand is written, then the summary is printed. A
second Ctrl-C aborts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from fastsam_backend.errors import BackendError
from fastsam_backend.ls.project import LsTask, ProjectClient, describe
from fastsam_backend.ls.protocol import predict_request

if TYPE_CHECKING:
    from fastsam_backend.jobs.queues import JobQueues
    from fastsam_backend.service.orchestrator import FastSAMService
    from fastsam_backend.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What a run did (``--report`` writes it as JSON)."""

    project: int
    model_version: str
    mode: str = "in-process"  # or "queue"
    tasks_seen: int = 0
    done: int = 0  # predictions written (or, with --dry-run, made)
    skipped: int = 0  # a prediction of this model_version was there already
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"task": id, "reason": "..."}
    pending: int = 0  # queue mode, stopped early: still queued or running in the workers
    requeued: int = 0  # queue mode: jobs lost with a Redis that restarted empty, enqueued again
    no_worker: bool = False  # queue mode: stopped following because no worker listened (--fallback-in-process)
    dry_run: bool = False
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return round(self.done / self.seconds, 3) if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed_count": len(self.failed), "images_per_s": self.images_per_s}

    def text(self) -> str:
        verb = "predicted (dry run, nothing written)" if self.dry_run else "written"
        lines = [f"project {self.project}, model_version {self.model_version} ({self.mode}):",
                 f"  {self.done} {verb}, {self.skipped} skipped (already predicted), {len(self.failed)} failed, "
                 f"{self.tasks_seen} tasks looked at, {self.seconds:.1f} s ({self.images_per_s:.2f} images/s)"]
        if self.requeued:
            lines.append(f"  {self.requeued} jobs lost in a Redis restart were enqueued again")
        if self.pending:
            lines.append(f"  {self.pending} still queued or running in the workers")
        if self.interrupted:
            lines.append("  interrupted: run the same command again to resume (predicted tasks are skipped)")
        for failure in self.failed[:20]:
            lines.append(f"  failed: task {failure['task']}: {failure['reason']}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more (see --report)")
        return "\n".join(lines)


class StopFlag:
    """Set by the first SIGINT; the second one raises KeyboardInterrupt as usual."""

    def __init__(self, notify: Callable[[str], None] | None = None) -> None:
        self._event = threading.Event()
        self._notify = notify

    def __bool__(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    @contextmanager
    def on_sigint(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, frame: Any) -> None:
            if self._event.is_set():
                raise KeyboardInterrupt
            self._event.set()
            if self._notify:
                self._notify("stopping after the current batch (Ctrl-C again to abort) ...")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def pending_tasks(client: ProjectClient, model_version: str, summary: Summary, limit: int | None,
                  stop: StopFlag) -> list[LsTask]:
    """The tasks without a prediction of ``model_version``, at most ``limit``, in the project's order."""
    todo: list[LsTask] = []
    for task in client.tasks():
        if stop or (limit is not None and len(todo) >= limit):
            break
        summary.tasks_seen += 1
        if model_version in task.model_versions:
            summary.skipped += 1
        else:
            todo.append(task)
    return todo


def predict_tasks(service: FastSAMService, tasks: list[LsTask], label_config: str,
                  project_id: int) -> list[dict[str, Any]]:
    """One prediction (or ``{"error": ...}``) per task, from the service's own ``predict``."""
    request = predict_request([{"id": t.id, "data": t.data} for t in tasks], label_config=label_config,
                              project=str(project_id))
    try:
        return service.predict(request)
    except BackendError as exc:  # a single task, or a batch where every task failed
        return [{"error": exc.message} for _ in tasks]


def run_in_process(service: FastSAMService, client: ProjectClient, *, limit: int | None = None,
                   dry_run: bool = False, batch_size: int = 8, stop: StopFlag | None = None,
                   progress: Callable[..., Any] | None = None) -> Summary:
    """Predict and write every pending task here; ``progress(total=...)`` makes the bar (tqdm)."""
    stop = stop if stop is not None else StopFlag()
    started = time.monotonic()
    version = service.project_version(str(client.project_id))
    summary = Summary(client.project_id, version, dry_run=dry_run)
    label_config = client.label_config()
    todo = pending_tasks(client, version, summary, limit, stop)
    service.models.wait_until_loaded()
    bar = (progress or _no_bar)(total=len(todo))
    try:
        for start in range(0, len(todo), batch_size):
            if stop:
                break
            # asked again right before the work: the listing's column can be cut short, and another
            # run (or a worker) may have predicted the task since it was listed
            batch = []
            for task in todo[start:start + batch_size]:
                if version in client.model_versions(task.id):
                    summary.skipped += 1
                    bar.update(1)
                else:
                    batch.append(task)
            if not batch:
                continue
            for task, prediction in zip(batch, predict_tasks(service, batch, label_config, client.project_id)):
                if "error" in prediction:
                    summary.failed.append({"task": task.id, "reason": prediction["error"]})
                elif dry_run:
                    summary.done += 1
                else:
                    try:
                        client.write_prediction(task.id, prediction, version)
                        summary.done += 1
                    except Exception as exc:  # out of retries, or refused: reported, the run goes on
                        summary.failed.append({"task": task.id, "reason": f"writing the prediction: {describe(exc)}"})
                bar.update(1)
                bar.set_postfix(done=summary.done, failed=len(summary.failed), refresh=False)
    finally:
        bar.close()
        summary.interrupted = bool(stop) and summary.done + len(summary.failed) < len(todo)
        summary.seconds = round(time.monotonic() - started, 2)
    return summary


def run_queued(queues: JobQueues, client: ProjectClient, model_version: str, *, limit: int | None = None,
               stop: StopFlag | None = None, progress: Callable[..., Any] | None = None,
               poll_s: float = 0.5, follow: bool = True, fallback: bool = False,
               notify: Callable[[str], None] | None = None, outage_limit_s: float | None = None) -> Summary:
    """Enqueue a pre-annotate job per pending task, then follow them until they end (or Ctrl-C),
    through Redis outages and lost jobs (``follow.py``). With ``fallback``, returns with
    ``no_worker`` set when no worker listens, the jobs still open removed from the queue."""
    from fastsam_backend.jobs.enqueue import enqueue_preannotate
    from fastsam_backend.jobs.follow import OUTAGE_LIMIT_S, Follower
    from fastsam_backend.jobs.outage import RedisWait, is_outage
    from fastsam_backend.jobs.queues import JobKind

    stop = stop if stop is not None else StopFlag()
    started = time.monotonic()
    summary = Summary(client.project_id, model_version, mode="queue")
    todo = pending_tasks(client, model_version, summary, limit, stop)
    extra: dict[str, Any] = {}
    bar: Any = _NoBar()

    def status(fields: dict[str, Any]) -> None:
        extra.update(fields)
        bar.set_postfix(done=summary.done, failed=len(summary.failed), **extra, refresh=True)

    wait = RedisWait(limit_s=OUTAGE_LIMIT_S if outage_limit_s is None else outage_limit_s, stopping=lambda: bool(stop),
                     on_wait=lambda s: status({"redis": f"down {s:.0f}s"}))
    try:
        report = wait.call(enqueue_preannotate, queues, client.url, client.project_id, [t.id for t in todo],
                           model_version, what="enqueueing the pre-annotate jobs")
    except Exception as exc:
        if not (stop and is_outage(exc)):
            raise
        summary.interrupted, summary.pending = True, len(todo)  # Ctrl-C while waiting for Redis
        summary.seconds = round(time.monotonic() - started, 2)
        return summary
    log.info("enqueued %d pre-annotate jobs (%d were queued or running already)", report.enqueued, report.duplicate)
    task_of = dict(zip(report.job_ids, (t.id for t in todo)))

    def requeue(job_id: str) -> None:
        enqueue_preannotate(queues, client.url, client.project_id, [task_of[job_id]], model_version)

    def ended(state: Any) -> None:
        outcome = (state.result or {}).get("outcome")
        if state.status == "finished":
            summary.skipped += outcome == "skipped"
            summary.done += outcome != "skipped"
        else:
            summary.failed.append({"task": task_of[state.job_id], "reason": state.reason or state.status})
        bar.update(1)
        bar.set_postfix(done=summary.done, failed=len(summary.failed), **extra, refresh=False)

    follower = Follower(queues, JobKind.PREANNOTATE, report.job_ids, stop=lambda: bool(stop), notify=notify,
                        is_done=lambda job_id: model_version in client.model_versions(task_of[job_id]),
                        requeue=requeue, status=status, fallback=fallback, wait=wait)
    bar = (progress or _no_bar)(total=len(report.job_ids))
    open_ids = list(report.job_ids)
    try:
        if follow:
            open_ids = follower.run(ended, poll_s=poll_s)
        if follower.no_worker:
            wait.call(queues.remove_queued, JobKind.PREANNOTATE, open_ids, what="taking back the open jobs")
    finally:
        bar.close()
        summary.requeued = follower.requeued
        summary.no_worker = follower.no_worker
        summary.pending = 0 if follower.no_worker else len(open_ids)
        summary.interrupted = bool(stop) and bool(open_ids)
        summary.seconds = round(time.monotonic() - started, 2)
    return summary


def write_one(service: FastSAMService, client: ProjectClient, task_id: int, model_version: str) -> str:
    """The pre-annotate job's work: ``"written"``, or ``"skipped"`` when the task has this version."""
    task = client.task(task_id)
    if model_version in task.model_versions:
        return "skipped"
    request = predict_request([{"id": task.id, "data": task.data}], label_config=client.label_config(),
                              project=str(client.project_id))
    prediction = service.predict(request)[0]  # one task: a failure raises (BadRequest is never retried)
    client.write_prediction(task_id, prediction, model_version)
    return "written"


_CLIENTS: dict[tuple[str, int], ProjectClient] = {}


def project_client(settings: Settings, project_id: int) -> ProjectClient:
    """The worker's client for a project, from ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``
    (workers never receive ``/setup``, so nothing else can tell them where Label Studio is)."""
    from fastsam_backend.jobs.queues import JobRefused

    if not settings.label_studio_url or settings.label_studio_api_key is None:
        raise JobRefused("pre-annotate jobs need LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY in the worker's "
                         "environment")
    key = (settings.label_studio_url, int(project_id))
    if key not in _CLIENTS:
        _CLIENTS[key] = ProjectClient(settings.label_studio_url, settings.label_studio_api_key.get_secret_value(),
                                      int(project_id))
    return _CLIENTS[key]


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def _no_bar(total: int) -> _NoBar:
    return _NoBar()
