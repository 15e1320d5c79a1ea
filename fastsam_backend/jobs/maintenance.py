"""The workers' maintenance thread: registry cleaning, due retries, liveness -- by one worker of the
whole deployment at a time (a Redis lock), plus each worker's own heartbeat and registration.

Every ``CLEANUP_S`` the lock holder cleans RQ's registries (a started job whose heartbeat went stale
goes back to its queue as one of its retries, or to the failed registry), gives back jobs a dead
worker had taken ahead (``rescue_ahead``) and enqueues retries whose backoff is due (RQ's scheduler,
run in this thread instead of in a forked process). Every worker, lock or not, beats its own
heartbeat every ``beat_s`` (so followers can tell a live worker from a killed one, ``queues.live_workers``)
and registers again after a Redis that restarted empty. Redis errors are logged once per outage.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from fastsam_backend.jobs.queues import QueueConfig

log = logging.getLogger(__name__)

CLEANUP_S = 5
TICK_S = 1.0
LOCK_TTL_MS = 5000
RESCUE_AFTER_S = 10  # a job in an intermediate list, not started and held by no one, this long goes back

# take the lock, or refresh it if it is ours (one script, so two workers never both hold it)
_LOCK_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""



def give_back(queue: Any, job_id: str) -> None:
    """A job taken off ``queue`` but never started goes back to its front."""
    with queue.connection.pipeline() as pipe:
        pipe.lrem(queue.intermediate_queue.key, 1, job_id)
        pipe.lpush(queue.key, job_id)
        pipe.execute()


def utcnow() -> Any:
    from rq.utils import now

    return now()


class Maintenance(threading.Thread):
    """Registry cleaning and due retries, by one worker of the whole deployment at a time."""

    def __init__(self, worker: Any, config: QueueConfig, beat_s: float = 5.0) -> None:
        super().__init__(name="fastsam-maintenance", daemon=True)
        self.worker, self.config, self.beat_s = worker, config, beat_s
        self.stopped = threading.Event()
        self._token = uuid.uuid4().hex
        self._lock = worker.connection.register_script(_LOCK_LUA)
        self._unheld: dict[str, float] = {}  # job id -> when first seen taken, not started and held by no one

    def run(self) -> None:
        from rq.scheduler import RQScheduler
        from rq.serializers import JSONSerializer

        scheduler = RQScheduler(self.config.queue_names, connection=self.worker.connection, serializer=JSONSerializer)
        scheduler.prepare_registries(self.config.queue_names)
        last_clean, last_beat, warned = 0.0, 0.0, False
        while not self.stopped.wait(TICK_S):
            try:
                self.worker.ensure_registered()  # at once after a Redis that restarted empty, even while idle
                if time.monotonic() - last_beat >= self.beat_s:
                    last_beat = time.monotonic()
                    self.worker.beat_alive()
                if not self._lock(keys=[self.config.maintenance_key], args=[self._token, LOCK_TTL_MS]):
                    continue
                scheduler.enqueue_scheduled_jobs()  # retries whose backoff is over
                if time.monotonic() - last_clean >= CLEANUP_S:
                    last_clean = time.monotonic()
                    self.clean()
                warned = False
            except Exception as exc:  # Redis restarting: try again next tick, say so once
                (log.debug if warned else log.warning)("job maintenance failed: %s", exc)
                warned = True

    def clean(self) -> None:
        from rq import worker_registration
        from rq.registry import clean_registries

        for queue in self.worker.queues:
            self.rescue_ahead(queue)
            clean_registries(queue, [self.worker.fastsam_on_failure])  # stale started jobs: retried or failed
            worker_registration.clean_worker_registry(queue)
            queue.intermediate_queue.cleanup(self.worker, queue)  # dequeued by a worker that died at once


    def rescue_ahead(self, queue: Any, now: float | None = None) -> None:
        """Jobs a worker took ahead and died holding go back to the front of their queue after
        ``RESCUE_AFTER_S`` (RQ's own cleanup would fail them over to a retry after a minute)."""
        now = time.monotonic() if now is None else now
        conn, seen = self.worker.connection, set()
        for job_id in queue.intermediate_queue.get_job_ids():
            seen.add(job_id)
            if job_id in queue.started_job_registry or conn.exists(self.config.ahead_key(job_id)):
                self._unheld.pop(job_id, None)
                continue
            if now - self._unheld.setdefault(job_id, now) >= RESCUE_AFTER_S:
                log.warning("job %s was taken ahead by a worker that is gone: back to its queue", job_id)
                give_back(queue, job_id)
                self._unheld.pop(job_id, None)
        for job_id in set(self._unheld) - seen:
            del self._unheld[job_id]
