"""Following jobs to their end -- ``preannotate --queue``, ``warm --wait`` -- through the faults a
deployment meets: a Redis outage, a Redis that came back empty, no worker listening.

``Follower.run`` polls the jobs' states and hands each ended one to ``on_end``. Meanwhile:

- **Redis away**: every call waits with backoff (``outage.RedisWait``), the outage shown through
  ``status``; past ``outage_limit_s`` it raises ``RedisOutage`` (the command prints one line and
  how to resume).
- **Jobs gone**: a job whose key is missing either ended and its result expired, or vanished with a
  Redis that restarted without persistence. Once it has been missing ``LOST_GRACE_S`` (long
  enough for a worker still running it to say so again, ``QueueConfig.running_key``) the source of
  truth decides: ``is_done(job_id)`` (Label Studio holds the task's prediction of this
  model_version; the image is cached) ends it, else ``requeue(job_id)`` enqueues it again. Jobs are
  idempotent (a pre-annotate job skips a task that holds its prediction), so this never writes twice.
- **Work lost after it ended**: a Redis that came back empty also took what jobs that had ended
  before it left wrote there (a warm job's cache entries). After each outage, the jobs that ended
  well are checked once more with ``is_done`` and those whose work is gone are enqueued again and
  followed; ``on_end`` hears of such a job again only if its second run fails.
- **No worker**: when no live worker is registered on the queue while jobs are open, ``notify``
  says so within ``NO_WORKER_AFTER_S``, once per spell; with ``fallback`` the run returns instead
  (``no_worker`` set) so that the caller can do the rest in its own process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastsam_backend.jobs.outage import RedisWait, is_outage
from fastsam_backend.jobs.queues import ACTIVE, JobKind, JobState

if TYPE_CHECKING:
    from fastsam_backend.jobs.queues import JobQueues

log = logging.getLogger(__name__)

LOST_GRACE_S = 10.0  # two worker heartbeats: a job still running is marked so again within this
NO_WORKER_AFTER_S = 2.0
WORKER_CHECK_S = 1.0
OUTAGE_LIMIT_S = 300.0


def no_worker_message(queue_name: str) -> str:
    return f"no worker is listening on {queue_name}: start fastsam-backend worker"


class Follower:
    """Follows ``job_ids`` of one ``kind`` until each has ended (see the module docstring)."""

    def __init__(self, queues: JobQueues, kind: JobKind, job_ids: list[str], *,
                 is_done: Callable[[str], bool], requeue: Callable[[str], None],
                 stop: Callable[[], bool] = lambda: False, notify: Callable[[str], None] | None = None,
                 status: Callable[[dict[str, Any]], None] | None = None, fallback: bool = False,
                 outage_limit_s: float = OUTAGE_LIMIT_S, wait: RedisWait | None = None) -> None:
        self.queues, self.kind, self.open = queues, kind, list(job_ids)
        self.is_done, self.requeue, self.stop = is_done, requeue, stop
        self.notify = notify or (lambda message: log.warning("%s", message))
        self.status = status or (lambda fields: None)
        self.fallback = fallback
        self.wait = wait or RedisWait(limit_s=outage_limit_s, stopping=stop,
                                      on_wait=lambda s: self.status({"redis": f"down {s:.0f}s"}))
        self.missing_since: dict[str, float] = {}
        self.requeued = 0
        self.no_worker = False  # returned early: no worker, and fallback asked for
        self._workers_checked = 0.0
        self._no_worker_since: float | None = None
        self._told = False
        self._outages_told = 0

    def run(self, on_end: Callable[[JobState], None], poll_s: float = 0.5) -> list[str]:
        """Until every job ended, ``stop()`` or (with ``fallback``) no worker; the jobs still open."""
        ended_well: list[str] = []
        reported: set[str] = set()
        verified_outages = 0

        def ended(state: JobState) -> None:
            if state.job_id not in reported or state.status != "finished":
                on_end(state)
            reported.add(state.job_id)
            if state.status == "finished":
                ended_well.append(state.job_id)

        while True:
            self._follow(ended, poll_s)
            if self.open or self.stop() or self.no_worker or self.wait.outages == verified_outages:
                return self.open
            verified_outages = self.wait.outages
            self.open = self._work_lost(ended_well)
            ended_well = [j for j in ended_well if j not in self.open]

    def _work_lost(self, ended_well: list[str]) -> list[str]:
        """Jobs that ended well but whose work a Redis that came back empty took along: enqueued again."""
        lost = [j for j in ended_well if not self.wait.call(self.is_done, j, what="checking what a restart lost")]
        for job_id in lost:
            log.info("job %s ended, but its work was lost (a Redis restart?): enqueued again", job_id)
            self.wait.call(self.requeue, job_id, what="enqueueing a lost job again")
        if lost:
            self.requeued += len(lost)
            self.status({"requeued": self.requeued})
        return lost

    def _follow(self, on_end: Callable[[JobState], None], poll_s: float) -> None:
        while self.open and not self.stop():
            try:
                states = self.wait.call(self.queues.states, self.open, what="following the jobs")
            except Exception as exc:
                if self.stop() and is_outage(exc):  # Ctrl-C during an outage: the caller reports what is open
                    break
                raise
            if self.wait.outages > self._outages_told:
                self._outages_told = self.wait.outages
                self.status({"redis": "back"})
            still: list[str] = []
            missing: list[str] = []
            for state in states:
                if state.status in ACTIVE:
                    self.missing_since.pop(state.job_id, None)
                    still.append(state.job_id)
                elif state.status is None:
                    missing.append(state.job_id)
                else:
                    self.missing_since.pop(state.job_id, None)
                    on_end(state)
            still += self._reconcile(missing, on_end)
            self.open = still
            if self.open and self._check_workers():
                self.no_worker = True
                break
            if self.open:
                time.sleep(poll_s)

    def _reconcile(self, missing: list[str], on_end: Callable[[JobState], None]) -> list[str]:
        """Missing jobs past the grace: ended (the source of truth has their work) or enqueued again."""
        now = time.monotonic()
        due = [j for j in missing if now - self.missing_since.setdefault(j, now) >= LOST_GRACE_S]
        if not due:
            return missing
        running = self.wait.call(self.queues.running, due, what="looking for lost jobs")
        for job_id in due:
            if job_id in running:
                continue
            del self.missing_since[job_id]
            if self.wait.call(self.is_done, job_id, what="looking for lost jobs"):
                on_end(JobState(job_id, "finished", result={"outcome": "done"}))
                missing.remove(job_id)
            else:
                log.info("job %s was lost (a Redis restart?): enqueued again", job_id)
                self.wait.call(self.requeue, job_id, what="enqueueing a lost job again")
                self.requeued += 1
        if self.requeued:
            self.status({"requeued": self.requeued})
        return missing

    def _check_workers(self) -> bool:
        """Tells once per spell that no worker listens; True when the caller should fall back."""
        now = time.monotonic()
        if now - self._workers_checked < WORKER_CHECK_S:
            return False
        self._workers_checked = now
        if self.wait.call(self.queues.live_workers, self.kind, what="counting workers") > 0:
            if self._told:
                self.status({"workers": "back"})
            self._no_worker_since, self._told = None, False
            return False
        self._no_worker_since = self._no_worker_since or now
        if now - self._no_worker_since < NO_WORKER_AFTER_S or self._told:
            return False
        self._told = True
        name = self.queues.config.queue_name(self.kind)
        self.notify(no_worker_message(name) + (" (predicting in this process instead)" if self.fallback else
                                               " (waiting for one)"))
        self.status({"workers": 0})
        return self.fallback
