"""Prometheus metrics (module-level collectors, the prometheus_client idiom).

With several gunicorn workers set ``PROMETHEUS_MULTIPROC_DIR`` (the gunicorn
config does it for you) so ``/metrics`` sums all workers, not just the one that
happened to answer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100)

REQUESTS = Counter("fastsam_requests_total", "HTTP requests", ["route", "method", "status"])
REQUEST_SECONDS = Histogram("fastsam_request_seconds", "HTTP request latency", ["route"],
                            buckets=LATENCY_BUCKETS)
CACHE_LOOKUPS = Counter("fastsam_cache_lookups_total", "Mask cache lookups per image", ["result"])
SEGMENT_SECONDS = Histogram("fastsam_segment_seconds", "FastSAM all-instance pass (cold image)",
                            buckets=LATENCY_BUCKETS)
ERRORS = Counter("fastsam_errors_total", "Requests answered with an error", ["kind"])
BATCH_TASKS = Counter("fastsam_batch_tasks_total", "Tasks of multi-task (pre-annotation) /predict requests",
                      ["outcome"])  # predicted, failed (image not had), deferred (time budget spent)


def render(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """The exposition text for this process, or for all workers in multiprocess mode, plus the
    ``extra`` collectors (read at scrape time: the job queues' state in Redis)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        text = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY

        text = generate_latest(REGISTRY)
    extra = list(extra)
    if extra:
        registry = CollectorRegistry(auto_describe=False)
        for collector in extra:
            registry.register(collector)
        text += generate_latest(registry)
    return text, CONTENT_TYPE_LATEST
