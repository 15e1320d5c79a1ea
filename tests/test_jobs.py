"""The job queues without a model: ids, deduplication, the webhook, /metrics, the single flight
between a running warm job and a click, and pre-annotation against a fake Label Studio.

Everything runs over the scenes' ground truth (``GroundTruthSegmenter``) on a ``redis-server`` of
its own; jobs run in this process through the same ``SimpleWorker`` class the ``worker`` command
uses. ``test_workers.py`` does the same with real worker processes and the trained fixture model.
"""

from __future__ import annotations

import functools
import signal
import threading
import time

import pytest

from fastsam_backend.jobs import enqueue, functions
from fastsam_backend.jobs.enqueue import enqueue_warm, warm_job_id
from fastsam_backend.jobs.preannotate_project import StopFlag, run_in_process
from fastsam_backend.jobs.queues import JobKind, JobQueues, QueueConfig
from fastsam_backend.jobs.worker import make_worker
from fastsam_backend.ls.project import ProjectClient
from fastsam_backend.quality.fake import GroundTruthSegmenter
from fastsam_backend.quality.fakels import FakeLabelStudio, serve
from fastsam_backend.quality.scenes import generate_scene
from fastsam_backend.server import create_app
from fastsam_backend.service.orchestrator import build_service
from tests.helpers import LABEL_CONFIG, interior_point, keypoint, png_bytes

TOKEN = "f" * 40


@functools.cache
def scenes() -> list:
    """The fake project's 60 scenes, made on first use (not while every test module is collected)."""
    return [generate_scene(3_000_000 + i, (96, 128)) for i in range(60)]


@pytest.fixture
def fake_ls(tmp_path):
    (tmp_path / "data" / "upload" / "1").mkdir(parents=True)
    fake = FakeLabelStudio(tmp_path, token=TOKEN)
    fake.add_project(1, LABEL_CONFIG)
    for i, scene in enumerate(scenes()):
        (tmp_path / "data" / "upload" / "1" / f"s{i}.png").write_bytes(png_bytes(scene.image))
        fake.add_task(1, {"image": f"/data/upload/1/s{i}.png"})
    server, url = serve(fake)
    yield fake, url
    server.shutdown()


@pytest.fixture
def make_service(make_settings):
    """Services over the scenes' ground truth; each has its own segmenter (``.calls`` counts)."""
    made = []

    def make(**overrides):
        settings = make_settings(clip_enabled=False, default_label="Banana", batch_time_budget_s=0, **overrides)
        service = build_service(settings, GroundTruthSegmenter(scenes()))
        made.append(service)
        return service

    yield make
    functions._PROCESS.clear()


def run_jobs(config: QueueConfig, queues: JobQueues) -> None:
    """Drain the queues here with the worker command's own worker class (burst: until empty)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        make_worker(config, config.queue_names, queues.connection).work(burst=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_job_ids_come_from_what_the_enqueuer_knows():
    config = QueueConfig("redis://unused")
    model = ["fastsam-s", {"imgsz": 1024}, None]
    assert warm_job_id(config, "/a.png", model) == warm_job_id(config, "/a.png", model)
    assert warm_job_id(config, "/a.png", model) != warm_job_id(config, "/b.png", model)
    assert warm_job_id(config, "/a.png", model) != warm_job_id(config, "/a.png", ["fastsam-s", {"imgsz": 640}, None])
    pre = enqueue.preannotate_job_id
    assert pre(config, "http://ls/", 7, "v1") == pre(config, "http://ls", 7, "v1")
    assert pre(config, "http://ls", 7, "v1") != pre(config, "http://ls", 7, "v2")


def test_a_job_enqueued_twice_runs_once_then_a_cached_image_is_skipped(own_redis, fake_ls, make_service):
    _, ls_url = fake_ls
    service = make_service(redis_url=own_redis.url, label_studio_url=ls_url, label_studio_api_key=TOKEN)
    functions.install_service(service)
    config = QueueConfig.from_settings(service.settings)
    queues = JobQueues(config)
    first = enqueue_warm(queues, service, ["/data/upload/1/s0.png"])
    second = enqueue_warm(queues, service, ["/data/upload/1/s0.png"])
    assert (first.enqueued, first.duplicate, second.enqueued, second.duplicate) == (1, 0, 0, 1)
    assert len(queues.queues[JobKind.WARM]) == 1
    run_jobs(config, queues)
    assert service.segmenter.calls == 1
    [state] = queues.states(first.job_ids)
    assert state.status == "finished" and state.result["outcome"] == "computed"
    assert enqueue_warm(queues, service, ["/data/upload/1/s0.png"]).cached == 1  # nothing to do any more
    assert own_redis.raw().hgetall(config.stats_key) == {b"warm:computed": b"1"}


def test_failures_are_retried_then_show_in_the_failed_registry(own_redis, fake_ls, make_service):
    _, ls_url = fake_ls
    service = make_service(redis_url=own_redis.url, label_studio_url=ls_url, label_studio_api_key=TOKEN,
                           job_retry_intervals="0")
    functions.install_service(service)
    config = QueueConfig.from_settings(service.settings)
    queues = JobQueues(config)
    missing = enqueue_warm(queues, service, ["/data/upload/1/missing.png"])  # 404: retried, then failed
    run_jobs(config, queues)
    [state] = queues.states(missing.job_ids)
    assert state.status == "failed" and "HTTP 404" in state.reason
    stats = own_redis.raw().hgetall(config.stats_key)
    assert stats == {b"warm:retried": b"3", b"warm:failed": b"1"}
    from rq.registry import FailedJobRegistry

    assert FailedJobRegistry(config.queue_name(JobKind.WARM), connection=queues.connection).count == 1

    # a job no retry can help (a worker whose settings differ from the enqueuer's) fails at once
    refused = enqueue.enqueue_preannotate(queues, ls_url, 1, [1], "another-model-version")
    run_jobs(config, queues)
    [state] = queues.states(refused.job_ids)
    assert state.status == "failed" and "JobRefused" in state.reason and "another-model-version" in state.reason
    assert own_redis.raw().hget(config.stats_key, "preannotate:failed") == b"1"
    assert own_redis.raw().hget(config.stats_key, "preannotate:retried") is None


def test_tasks_created_webhook_enqueues_warm_jobs_and_metrics_show_them(own_redis, fake_ls, make_service):
    _, ls_url = fake_ls
    service = make_service(redis_url=own_redis.url, label_studio_url=ls_url, label_studio_api_key=TOKEN)
    client = create_app(service.settings, service).test_client()
    body = {"action": "TASKS_CREATED", "project": {"id": 1, "label_config": LABEL_CONFIG},
            "tasks": [{"id": i + 1, "data": {"image": f"/data/upload/1/s{i}.png"}} for i in range(3)]
            + [{"id": 99, "data": {"text": "no image"}}]}
    response = client.post("/webhook", json=body)
    assert response.status_code == 201, response.json
    assert response.json["warm"] == {"tasks": 4, "enqueued": 3, "duplicate": 0, "cached": 0, "without_image": 1}
    assert client.post("/webhook", json=body).json["warm"]["duplicate"] == 3
    text = client.get("/metrics").text
    assert 'fastsam_jobs{queue="fastsam-warm",state="queued"} 3.0' in text
    assert "fastsam_jobs_redis_up 1.0" in text
    # the other events behave as before
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 201
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}).json == {"status": "Unknown event"}

    functions.install_service(service)
    run_jobs(QueueConfig.from_settings(service.settings), JobQueues(QueueConfig.from_settings(service.settings)))
    text = client.get("/metrics").text
    assert 'fastsam_jobs{queue="fastsam-warm",state="finished"} 3.0' in text
    assert 'fastsam_job_outcomes_total{kind="warm",outcome="computed"} 3.0' in text
    assert client.post("/webhook", json=body).json["warm"]["cached"] == 3


def test_webhook_without_redis_says_warming_is_off(make_service):
    service = make_service()
    response = create_app(service.settings, service).test_client().post(
        "/webhook", json={"action": "TASKS_CREATED", "tasks": []})
    assert response.status_code == 201 and "REDIS_URL" in response.json["warm"]


def test_a_cold_click_waits_for_the_running_warm_job(own_redis, fake_ls, make_service):
    """The worker's service and the HTTP service are separate (as in two processes), sharing Redis:
    a click that arrives while the warm job segments waits for it and segments nothing itself."""
    _, ls_url = fake_ls
    common = dict(redis_url=own_redis.url, label_studio_url=ls_url, label_studio_api_key=TOKEN)
    worker_side, http_side = make_service(**common), make_service(**common)
    segmenting, release = threading.Event(), threading.Event()
    real_segment = worker_side.segmenter.segment

    def slow_segment(pixels):
        segmenting.set()
        release.wait(10)
        return real_segment(pixels)

    worker_side.segmenter.segment = slow_segment
    functions.install_service(worker_side)
    job = threading.Thread(target=functions.warm_image, args=("/data/upload/1/s1.png",))
    job.start()
    assert segmenting.wait(10)
    scene = scenes()[1]
    x, y = interior_point(scene.objects[0].mask)
    h, w = scene.image.shape[:2]
    client = create_app(http_side.settings, http_side).test_client()
    answer: dict = {}
    click = threading.Thread(target=lambda: answer.update(r=client.post("/predict", json={
        "tasks": [{"id": 1, "data": {"image": "/data/upload/1/s1.png"}}], "label_config": LABEL_CONFIG,
        "params": {"context": {"result": [keypoint(x, y, w, h)]}}})))
    click.start()
    time.sleep(0.5)
    assert click.is_alive()  # waiting for the job, not segmenting
    release.set()
    job.join(10)
    click.join(10)
    assert answer["r"].status_code == 200 and answer["r"].json["results"][0]["result"]
    assert http_side.segmenter.calls == 0 and http_side.store.stats()["lock_waits"] == 1


@pytest.mark.slow  # seconds of waiting: the full lane (make test), not make test-fast
def test_preannotate_resumes_after_a_stop_with_one_prediction_per_task(fake_ls, make_service):
    fake, ls_url = fake_ls
    service = make_service(label_studio_url=ls_url, label_studio_api_key=TOKEN)
    client = ProjectClient(ls_url, TOKEN, 1)
    stop = StopFlag()
    updates: list[int] = []

    class Bar:  # what tqdm is handed: stop the run after 20 images, as Ctrl-C would
        def __init__(self, total):
            updates.append(total)

        def update(self, n=1):
            if len(updates) == 1 and sum(1 for _ in fake.predictions) >= 20:
                stop.set()

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    fake.fail_posts = 1  # one prediction is stored but its answer lost: resent only if it is not there
    first = run_in_process(service, client, batch_size=4, stop=stop, progress=Bar)
    assert first.interrupted and 20 <= first.done < 60 and not first.failed
    assert updates == [60]
    second = run_in_process(service, client, batch_size=4, progress=Bar)
    assert not second.interrupted and second.skipped == first.done + first.skipped
    assert second.done + second.skipped == 60 and updates[1] == 60 - second.skipped
    assert all(len(fake.predictions_of(t)) == 1 for t in fake.tasks)
    version = service.model_version
    assert {p["model_version"] for p in fake.predictions} == {version}
    assert all(p["result"] for p in fake.predictions)  # every scene has objects: every prediction has regions


def test_jobs_queued_under_an_earlier_release_s_dotted_paths_still_run(own_redis, fake_ls, make_service):
    """RQ stored each job's function path in Redis before the package was split (issue #22): those
    jobs must run after an upgrade (a refused learn/train job proves its function was found)."""
    _, ls_url = fake_ls
    service = make_service(redis_url=own_redis.url, label_studio_url=ls_url, label_studio_api_key=TOKEN,
                           job_retries=0)
    functions.install_service(service)
    config = QueueConfig.from_settings(service.settings)
    queues = JobQueues(config)
    queues.enqueue(JobKind.WARM, "fastsam_backend.jobs.warm_image", ["/data/upload/1/s1.png"], "old-warm", "old")
    queues.enqueue(JobKind.LEARN, "fastsam_backend.learn_jobs.learn_event", ["ANNOTATION_CREATED", {}], "old-learn",
                   "old")
    queues.enqueue(JobKind.TRAIN, "fastsam_backend.finetune_job.train_project", [1], "old-train", "old")
    run_jobs(config, queues)
    warm, learn, train = queues.states(["old-warm", "old-learn", "old-train"])
    assert warm.status == "finished" and warm.result["outcome"] == "computed"
    assert service.segmenter.calls == 1
    assert learn.status == "failed" and "JobRefused: this worker cannot learn labels" in learn.reason
    assert train.status == "failed" and "JobRefused: fine-tuning is off" in train.reason
