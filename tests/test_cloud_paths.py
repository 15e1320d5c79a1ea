"""Cloud storage images in every path that loads images: interactive and batch ``/predict``, warm
jobs (with a task id, and as queued before task ids: ``(url,)``), the ``TASKS_CREATED`` webhook,
pre-annotation, learning and training, against the fake Label Studio's resolve endpoint
(``quality/fakels.py``, "Use pre-signed URLs" off), over the scenes' ground truth.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest

from fastsam_backend.images.cloud import ImageRef
from fastsam_backend.jobs import functions
from fastsam_backend.jobs.enqueue import WARM_FUNC, enqueue_warm
from fastsam_backend.jobs.preannotate_project import run_in_process
from fastsam_backend.jobs.queues import JobKind, JobQueues, QueueConfig
from fastsam_backend.jobs.worker import job_image, make_worker
from fastsam_backend.ls.project import ProjectClient
from fastsam_backend.ls.rle import decode_rle, encode_rle
from fastsam_backend.quality.fake import GroundTruthSegmenter
from fastsam_backend.quality.fakels import FakeLabelStudio, serve
from fastsam_backend.quality.scenes import generate_scene
from fastsam_backend.server import create_app
from fastsam_backend.service.orchestrator import build_service
from tests.helpers import LABEL_CONFIG, interior_point, iou, keypoint, png_bytes

TOKEN = "c" * 40
SCENES = [generate_scene(3_100_000 + i, (96, 128)) for i in range(4)]
URIS = [f"s3://bucket/images/s{i}.png" for i in range(len(SCENES))]


@pytest.fixture
def cloud_ls(tmp_path):
    """A fake Label Studio whose project 1 has one task per scene, each an ``s3://`` URI it serves."""
    (tmp_path / "bucket").mkdir()
    fake = FakeLabelStudio(tmp_path, token=TOKEN)
    fake.add_project(1, LABEL_CONFIG)
    for scene, uri in zip(SCENES, URIS):
        name = uri.rsplit("/", 1)[1]
        (tmp_path / "bucket" / name).write_bytes(png_bytes(scene.image))
        fake.cloud[uri] = f"bucket/{name}"
        fake.add_task(1, {"image": uri})
    server, url = serve(fake)
    yield fake, url
    server.shutdown()


@pytest.fixture
def make_service(make_settings):
    def make(ls_url: str, **overrides):
        settings = make_settings(clip_enabled=False, default_label="Banana", batch_time_budget_s=0,
                                 label_studio_url=ls_url, label_studio_api_key=TOKEN, **overrides)
        return build_service(settings, GroundTruthSegmenter(SCENES))

    yield make
    functions._PROCESS.clear()


def fetched(fake: FakeLabelStudio) -> int:
    return fake.requests.get("GET /tasks/resolve", 0)


def click_body(i: int, task_id: int | None) -> dict:
    scene = SCENES[i]
    x, y = interior_point(scene.objects[0].mask)
    h, w = scene.image.shape[:2]
    task = {"data": {"image": URIS[i]}} | ({"id": task_id} if task_id is not None else {})
    return {"tasks": [task], "label_config": LABEL_CONFIG, "params": {"context": {"result": [keypoint(x, y, w, h)]}}}


def run_jobs(config: QueueConfig, queues: JobQueues) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        make_worker(config, config.queue_names, queues.connection).work(burst=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_interactive_click_on_a_cloud_image_then_a_second_click_fetches_nothing(cloud_ls, make_service):
    fake, url = cloud_ls
    service = make_service(url)
    client = create_app(service.settings, service).test_client()
    answer = client.post("/predict", json=click_body(1, 2))
    assert answer.status_code == 200, answer.json
    [region] = answer.json["results"][0]["result"]
    h, w = SCENES[1].image.shape[:2]
    mask = decode_rle(region["value"]["rle"], h, w)
    assert iou(mask, SCENES[1].objects[0].mask) > 0.9
    assert fetched(fake) == 1
    assert client.post("/predict", json=click_body(1, 2)).status_code == 200
    assert fetched(fake) == 1 and service.segmenter.calls == 1  # the memo keyed on the URI and Label Studio


def test_a_click_without_the_task_id_says_so(cloud_ls, make_service):
    _, url = cloud_ls
    service = make_service(url)
    answer = create_app(service.settings, service).test_client().post("/predict", json=click_body(0, None))
    assert answer.status_code == 422 and "no task id came with it" in answer.json["error"]


def test_batch_predict_on_cloud_tasks_one_missing_object_named(cloud_ls, make_service):
    fake, url = cloud_ls
    (fake.root / fake.cloud[URIS[2]]).unlink()  # deleted from the bucket after the sync
    service = make_service(url)
    body = {"tasks": [{"id": i + 1, "data": {"image": u}} for i, u in enumerate(URIS)], "label_config": LABEL_CONFIG}
    answer = create_app(service.settings, service).test_client().post("/predict", json=body)
    assert answer.status_code == 200
    results = answer.json["results"]
    assert [("error" in r) for r in results] == [False, False, True, False]
    assert all(r["result"] for r in results if "error" not in r)
    assert "tasks[2] (id 3)" in results[2]["error"] and "HTTP 424" in results[2]["error"]
    assert "could not read the object from the storage" in results[2]["error"]


def test_warm_jobs_carry_the_task_id_and_a_warmed_click_fetches_nothing(own_redis, cloud_ls, make_service):
    """The worker's service and the HTTP side's are separate (two processes), sharing Redis."""
    fake, url = cloud_ls
    worker_side, http_side = make_service(url, redis_url=own_redis.url), make_service(url, redis_url=own_redis.url)
    client = create_app(http_side.settings, http_side).test_client()
    body = {"action": "TASKS_CREATED", "project": {"id": 1, "label_config": LABEL_CONFIG},
            "tasks": [{"id": i + 1, "data": {"image": u}} for i, u in enumerate(URIS)]}
    assert client.post("/webhook", json=body).json["warm"]["enqueued"] == len(URIS)
    config = QueueConfig.from_settings(worker_side.settings)
    queues = JobQueues(config)
    jobs = queues.queues[JobKind.WARM].get_jobs()
    assert sorted(tuple(j.args) for j in jobs) == [(u, i + 1) for i, u in enumerate(URIS)]
    functions.install_service(worker_side)
    run_jobs(config, queues)
    assert worker_side.segmenter.calls == len(URIS) and fetched(fake) == len(URIS)
    answer = client.post("/predict", json=click_body(3, 4))
    assert answer.status_code == 200 and answer.json["results"][0]["result"]
    assert fetched(fake) == len(URIS) and http_side.segmenter.calls == 0  # nothing downloaded, nothing segmented
    assert client.post("/webhook", json=body).json["warm"]["cached"] == len(URIS)
    # the same URI under another task is the same image: cached too
    assert enqueue_warm(queues, http_side, [ImageRef(URIS[0], 2)]).cached == 1


def test_warm_jobs_queued_as_url_alone_still_run(own_redis, cloud_ls, make_service, tmp_path):
    fake, url = cloud_ls
    service = make_service(url, redis_url=own_redis.url, job_retries=0)
    functions.install_service(service)
    config = QueueConfig.from_settings(service.settings)
    queues = JobQueues(config)
    (fake.root / "data" / "upload" / "1").mkdir(parents=True)
    (fake.root / "data" / "upload" / "1" / "a.png").write_bytes(png_bytes(SCENES[0].image))
    queues.enqueue(JobKind.WARM, WARM_FUNC, ["/data/upload/1/a.png"], "old-args", "old")  # before task ids
    queues.enqueue(JobKind.WARM, WARM_FUNC, [URIS[1]], "old-cloud", "old")
    run_jobs(config, queues)
    old, cloud = queues.states(["old-args", "old-cloud"])
    assert old.status == "finished" and old.result["outcome"] == "computed"
    assert cloud.status == "failed" and "no task id came with it" in cloud.reason
    assert job_image(("u",)) == ImageRef("u") and job_image(["u", 5]) == ImageRef("u", 5)


def test_preannotate_fills_a_cloud_project(cloud_ls, make_service):
    fake, url = cloud_ls
    service = make_service(url)
    summary = run_in_process(service, ProjectClient(url, TOKEN, 1), batch_size=3)
    assert summary.done == len(URIS) and not summary.failed, summary.failed
    assert all(len(fake.predictions_of(t)) == 1 for t in fake.tasks)
    assert all(p["result"] for p in fake.predictions)


def test_learning_and_training_fetch_through_the_task(cloud_ls, make_service, monkeypatch):
    """Both pass the task id with the URL (the learned-label and fine-tuning maths are tested elsewhere)."""
    from fastsam_backend.jobs.train import gather
    from fastsam_backend.ls.annotations import parse_event

    fake, url = cloud_ls
    service = make_service(url)
    seen: list[ImageRef] = []
    real_load = service.images.load
    monkeypatch.setattr(service.images, "load", lambda source: seen.append(source) or real_load(source))
    h, w = SCENES[0].image.shape[:2]
    brush = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": w,
             "original_height": h, "value": {"format": "rle", "rle": encode_rle(SCENES[0].objects[0].mask),
                                             "brushlabels": ["Banana"]}}
    event = parse_event("ANNOTATION_CREATED", {"task": {"id": 1, "data": {"image": URIS[0]}},
                                               "annotation": {"id": 5, "task": 1, "result": [brush]},
                                               "project": {"id": 1, "label_config": LABEL_CONFIG}})
    monkeypatch.setattr(type(service.learner), "clip_id", property(lambda self: "clip"))
    monkeypatch.setattr(service, "crop_embeddings", lambda found, rows=None: np.ones((len(found.masks), 4), np.float32))
    service.learner._examples(event.annotations[0], "image", {"matched": 0, "own_crops": 0, "examples": 0})
    assert ImageRef(URIS[0], 1) in seen

    fake.tasks[2]["annotations"] = [{"id": 9, "task": 2, "result": [dict(brush, original_width=w)],
                                     "was_cancelled": False}]
    samples, keys = gather(service, ProjectClient(url, TOKEN, 1))
    assert keys == ["2"] and ImageRef(URIS[1], 2) in seen and len(samples) == 1



def test_a_failed_click_names_the_fix_in_the_status_line_and_health_keeps_it(cloud_ls, make_service):
    """Label Studio shows an interactive failure as ``"422 Client Error: <reason> for url: ..."``:
    the reason phrase names the image and the fix; /health keeps the whole message."""
    fake, url = cloud_ls
    (fake.root / fake.cloud[URIS[0]]).unlink()
    service = make_service(url)
    client = create_app(service.settings, service).test_client()
    answer = client.post("/predict", json=click_body(0, 1))
    assert answer.status_code == 422
    assert answer.status == f"422 {URIS[0]}: object missing or unreadable in the storage (HTTP 424)"
    assert "HTTP 424" in answer.json["error"] and "could not read the object" in answer.json["error"]
    failures = client.get("/health").json["recent_failures"]
    assert failures["count"] == 1 and failures["last"][0]["task"] == 1
    assert failures["last"][0]["error"] == "tasks[0] (id 1): " + answer.json["error"]


def test_the_warm_cli_names_a_cloud_uri_s_task(own_redis, cloud_ls, fastsam_weights, tmp_path):
    """``warm s3://… --task ID`` queues ``(uri, task id)``; ``--project`` takes each task's id."""
    from click.testing import CliRunner

    from fastsam_backend.cli import main
    from fastsam_backend.settings import load_settings

    _, url = cloud_ls
    env = {"REDIS_URL": own_redis.url, "FASTSAM_WEIGHTS": str(fastsam_weights), "MODEL_DIR": str(tmp_path),
           "FASTSAM_ALLOW_DOWNLOAD": "false", "CLIP_ENABLED": "false", "OUTBOUND_ALLOW": "127.0.0.1"}
    result = CliRunner().invoke(main, ["warm", URIS[0], "--task", "1", "--url", url, "--api-key", TOKEN], env=env)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["warm", "--project", "1", "--url", url, "--api-key", TOKEN], env=env)
    assert result.exit_code == 0, result.output
    assert f"{len(URIS)} images: {len(URIS) - 1} warm jobs enqueued, 1 queued or running already" in result.output
    queues = JobQueues(QueueConfig.from_settings(load_settings(redis_url=own_redis.url)))
    jobs = queues.queues[JobKind.WARM].get_jobs()
    assert sorted(tuple(j.args) for j in jobs) == [(u, i + 1) for i, u in enumerate(URIS)]
