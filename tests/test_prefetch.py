"""A worker takes its next warm job ahead and fetches its image while the current job runs.

In-process with the worker command's own worker class over a fake Label Studio, as
``test_jobs.py``; ``test_workers.py`` covers real worker processes.
"""

from __future__ import annotations

import signal

import pytest

from fastsam_backend.jobs import functions
from fastsam_backend.jobs.batching import warm_batch
from fastsam_backend.jobs.enqueue import enqueue_warm
from fastsam_backend.jobs.maintenance import RESCUE_AFTER_S, Maintenance
from fastsam_backend.jobs.prefetch import PrefetchingLoader
from fastsam_backend.jobs.queues import JobKind, JobQueues, QueueConfig
from fastsam_backend.jobs.worker import make_worker
from tests.test_jobs import TOKEN, fake_ls, make_service  # noqa: F401 (fixtures)

URLS = [f"/data/upload/1/s{i}.png" for i in range(5)]

pytestmark = pytest.mark.slow  # worker runs of seconds each: the full lane (make test), not make test-fast


def burst(config: QueueConfig, queues: JobQueues, prefetch=None, **batching):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = make_worker(config, config.queue_names, queues.connection, prefetch=prefetch, **batching)
    try:
        worker.work(burst=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return worker


def setup(own_redis, fake_ls, make_service, **overrides):  # noqa: F811
    _, ls_url = fake_ls
    service = make_service(redis_url=own_redis.url, label_studio_url=ls_url, label_studio_api_key=TOKEN,
                           **overrides)
    functions.install_service(service)
    config = QueueConfig.from_settings(service.settings)
    return service, config, JobQueues(config)


def test_each_next_image_is_fetched_ahead_and_every_job_runs_once(own_redis, fake_ls, make_service):  # noqa: F811
    service, config, queues = setup(own_redis, fake_ls, make_service)
    loader = service.images = PrefetchingLoader(service.images)
    report = enqueue_warm(queues, service, URLS)
    burst(config, queues, prefetch=loader.prefetch)
    assert [s.status for s in queues.states(report.job_ids)] == ["finished"] * len(URLS)
    assert service.segmenter.calls == len(URLS)
    assert loader.taken == len(URLS) - 1  # every job but the first found its image fetched already
    warm = queues.queues[JobKind.WARM]
    assert queues.connection.llen(warm.intermediate_queue.key) == 0  # nothing left taken and unstarted
    assert not queues.connection.keys(config.ahead_key("*"))
    assert own_redis.raw().hgetall(config.stats_key) == {b"warm:computed": str(len(URLS)).encode()}


def test_a_job_taken_ahead_goes_back_to_the_front_when_the_worker_stops(own_redis, fake_ls, make_service):  # noqa: F811
    service, config, queues = setup(own_redis, fake_ls, make_service)
    enqueue_warm(queues, service, URLS[:3])
    warm = queues.queues[JobKind.WARM]
    order = warm.get_job_ids()
    worker = make_worker(config, config.queue_names, queues.connection, prefetch=lambda url: None)
    worker.take_ahead()
    held = worker.ahead[0][0].id
    assert held == order[0] and warm.get_job_ids() == order[1:]
    assert queues.connection.exists(config.ahead_key(held))
    worker.give_back_ahead()
    assert warm.get_job_ids() == order  # back at the front, in its place
    assert queues.connection.llen(warm.intermediate_queue.key) == 0
    assert not queues.connection.exists(config.ahead_key(held))


def test_a_job_held_by_a_worker_that_died_goes_back_to_its_queue(own_redis, fake_ls, make_service):  # noqa: F811
    service, config, queues = setup(own_redis, fake_ls, make_service)
    enqueue_warm(queues, service, URLS[:2])
    warm = queues.queues[JobKind.WARM]
    dead = make_worker(config, config.queue_names, queues.connection, prefetch=lambda url: None)
    dead.take_ahead()
    held = dead.ahead[0][0].id
    maintenance = Maintenance(make_worker(config, config.queue_names, queues.connection), config)
    maintenance.rescue_ahead(warm, now=0.0)
    maintenance.rescue_ahead(warm, now=RESCUE_AFTER_S + 1)
    assert held not in warm.get_job_ids(), "a job whose holder is alive (its ahead key is set) stays held"

    queues.connection.delete(config.ahead_key(held))  # what the holder's death leaves: the key expires
    maintenance.rescue_ahead(warm, now=100.0)
    assert held not in warm.get_job_ids(), "not at once: a worker may be between dequeue and start"
    maintenance.rescue_ahead(warm, now=100.0 + RESCUE_AFTER_S)
    assert warm.get_job_ids()[0] == held
    assert queues.connection.llen(warm.intermediate_queue.key) == 0
    burst(config, queues)
    assert service.segmenter.calls == 2


def test_a_batching_worker_segments_its_jobs_in_full_batches_and_each_job_runs_once(
        own_redis, fake_ls, make_service):  # noqa: F811
    """A worker on a GPU: each batch starts at a job whose image is not cached, holds it and the
    next three taken ahead, and is one pass; the jobs of the batch then find their masks cached and
    still count as computed. Nine images in batches of four: passes of 4, 4 and 1."""
    service, config, queues = setup(own_redis, fake_ls, make_service)
    service.segmenter.batches = True
    urls = [f"/data/upload/1/s{i % 5}.png?copy={i}" for i in range(9)]  # 9 URLs, 5 distinct images
    loader = service.images = PrefetchingLoader(service.images, depth=4)
    report = enqueue_warm(queues, service, urls)
    worker = burst(config, queues, prefetch=loader.prefetch, batch=4,
                   warm_batch=lambda batch: warm_batch(service, batch, 4))
    assert [s.status for s in queues.states(report.job_ids)] == ["finished"] * len(urls)
    assert service.segmenter.passes == [4, 1]  # s0-s3 at once; s4 (copies of s0-s3 are cached)
    assert service.segmenter.calls == 5, "each image segmented once"
    stats = own_redis.raw().hgetall(config.stats_key)
    assert stats == {b"warm:computed": b"5", b"warm:cached": b"4"}
    assert worker.ahead == [] and queues.connection.llen(queues.queues[JobKind.WARM].intermediate_queue.key) == 0
    for url in urls:
        assert service.image_key_if_cached(url) is not None


def test_a_batch_that_fails_leaves_each_image_to_its_own_job(own_redis, fake_ls, make_service):  # noqa: F811
    service, config, queues = setup(own_redis, fake_ls, make_service)
    service.segmenter.batches = True
    segment_batch = service.segmenter.segment_batch

    def out_of_memory(images):
        if len(images) > 1:
            raise RuntimeError("CUDA out of memory")
        return segment_batch(images)

    service.segmenter.segment_batch = out_of_memory
    report = enqueue_warm(queues, service, URLS[:3])
    burst(config, queues, prefetch=lambda url: None, batch=3, warm_batch=lambda batch: warm_batch(service, batch, 3))
    assert [s.status for s in queues.states(report.job_ids)] == ["finished"] * 3
    assert service.segmenter.calls == 3
    assert own_redis.raw().hgetall(config.stats_key) == {b"warm:computed": b"3"}


def test_a_warm_shutdown_gives_every_job_taken_ahead_back_in_order(own_redis, fake_ls, make_service):  # noqa: F811
    service, config, queues = setup(own_redis, fake_ls, make_service)
    enqueue_warm(queues, service, URLS)
    warm = queues.queues[JobKind.WARM]
    order = warm.get_job_ids()
    worker = make_worker(config, config.queue_names, queues.connection, prefetch=lambda url: None, batch=4,
                         warm_batch=lambda batch: None)
    worker.take_ahead()
    assert [job.id for job, _, _ in worker.ahead] == order[:3] and warm.get_job_ids() == order[3:]
    worker.give_back_ahead()
    assert warm.get_job_ids() == order
    assert not queues.connection.keys(config.ahead_key("*"))
