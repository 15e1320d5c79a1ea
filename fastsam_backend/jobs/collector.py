"""``/metrics`` for the job queues: RQ's registries read at scrape time, every worker's work."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastsam_backend.jobs.queues import QueueConfig, connect, live_workers

log = logging.getLogger(__name__)


class JobsCollector:
    """Prometheus collector: the queues' state read from RQ's registries at scrape time, so
    ``/metrics`` of any replica shows every worker's work (jobs in Redis, not in this process)."""

    def __init__(self, config: QueueConfig) -> None:
        self.config = config
        self._connection: Any = None

    def _conn(self) -> Any:
        if self._connection is None:
            # a short connect timeout: /health is asked by Label Studio, which waits 1 s
            self._connection = connect(self.config.redis_url, timeout_s=1.0, connect_timeout_s=0.5, retry=False)
        return self._connection

    def health(self) -> dict[str, Any]:
        """For ``/health``: whether the queues' Redis answers and how many live workers listen on
        each queue (0 on a queue means its jobs wait: start ``fastsam-backend worker``)."""
        try:
            return {"redis": "up", "workers": live_workers(self._conn(), self.config.queue_names)}
        except Exception as exc:  # /health must answer whatever Redis does
            log.debug("job queue health unavailable: %s", exc)
            return {"redis": "down"}

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
        listening = GaugeMetricFamily("fastsam_job_workers_listening", "Workers with a recent heartbeat listening on "
                                      "each queue (0: its jobs wait for a worker)", labels=["queue"])
        try:
            conn, now = self._conn(), time.time()
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
            per_queue = live_workers(conn, names)
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
        for name in names:
            listening.add_metric([name], float(per_queue[name]))
        return [jobs, outcomes, up, workers, listening]
