"""Annotation webhooks learned off the request thread (issue #17) and the click path's revision memo
(issue #16).

The fast tests run over the scenes' ground truth (``GroundTruthSegmenter``, which counts and can hold
its segmentations) with a colour "CLIP" (``ColourClip``: a crop's embedding is its mean colour), so
no torch: the webhook answers 202 before anything is segmented, the examples appear once the
background thread is done, a second delivery is learned once, a full backlog is a 503, a deletion
that overtakes a queued create wins. The last test runs the RQ path on a real ``fastsam-backend
worker`` process with the trained fixture models (``test_workers.py``'s helpers).
"""

from __future__ import annotations

import functools
import os
import threading
import time

import numpy as np
import pytest

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.jobs import functions
from fastsam_backend.jobs.learn import event_key, slim_event
from fastsam_backend.labels.example_store import AnnotationExamples, RedisExamples
from fastsam_backend.labels.label_model import Example
from fastsam_backend.ls.annotations import parse_event
from fastsam_backend.quality.fake import GroundTruthSegmenter
from fastsam_backend.quality.labels_learned import example_events
from fastsam_backend.quality.scenes import generate_scene
from fastsam_backend.server import create_app
from fastsam_backend.service.learning import LearnConfig, Learner
from fastsam_backend.service.orchestrator import build_service
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ, MODELS

PROJECT = "77"
EVENTS = example_events(PROJECT, 1)[:3]


@functools.cache
def scenes() -> list:
    """The events' scenes, made on first use (not while every test module is collected)."""
    return [generate_scene(int(e["annotation"]["id"])) for e in EVENTS]


class ColourClip:
    """``ClipScorer``'s surface for learning: a mask's embedding is the unit mean colour of its pixels."""

    identity = "colour-clip"
    loaded = True
    error = None

    def load(self) -> None:
        """Nothing to load."""

    def available(self) -> bool:
        return True

    def embed_masks(self, pixels: np.ndarray, masks: MaskSet) -> np.ndarray:
        out = np.zeros((len(masks), 3), np.float32)
        for i, (crop, (x0, y0, x1, y1)) in enumerate(zip(masks.crops, masks.boxes.astype(int).tolist())):
            if crop.any():
                v = pixels[y0:y1, x0:x1][crop].mean(axis=0) + 1.0
                out[i] = v / np.linalg.norm(v)
        return out

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return np.tile(np.float32([1, 0, 0]), (len(texts), 1))


class HeldSegmenter(GroundTruthSegmenter):
    """Ground truth, but each segmentation waits for ``release`` and records the thread it ran on."""

    def __init__(self, scenes) -> None:
        super().__init__(scenes)
        self.release, self.entered = threading.Event(), threading.Event()
        self.threads: list[str] = []

    def segment(self, image):
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(60), "the test never released the segmenter"
        return super().segment(image)


@pytest.fixture
def learning_app(make_settings):
    """``(client, service, segmenter)``: a server whose learning needs no torch; ``**settings`` overrides."""
    made = []

    def make(**overrides):
        settings = make_settings(clip_enabled=True, learn_min_examples=1, **overrides)
        segmenter = HeldSegmenter(scenes())
        service = build_service(settings, segmenter)
        service.clip = service.models.clip = ColourClip()
        client = create_app(settings, service).test_client()
        made.append(segmenter)
        return client, service, segmenter

    yield make
    for segmenter in made:
        segmenter.release.set()
    functions._PROCESS.clear()


def wait_until(check, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return found


def learned_labels(service) -> dict[str, int]:
    model = service.learner.model_for(PROJECT)
    return {} if model is None else {lab: model.count(lab) for lab in model.labels}


def test_the_webhook_answers_before_segmenting_and_the_examples_appear_afterwards(learning_app):
    client, service, segmenter = learning_app()
    body = EVENTS[0]
    r = client.post("/webhook", json=body)
    assert r.status_code == 202, r.json
    assert r.json["status"] == "accepted"
    assert r.json["result"]["background"] == "thread" and r.json["result"]["annotations"] == [
        str(body["annotation"]["id"])]
    assert threading.current_thread().name not in segmenter.threads  # nothing segmented in the request
    assert learned_labels(service) == {}
    segmenter.release.set()
    wanted = {r["value"]["brushlabels"][0]: 1 for r in body["annotation"]["result"]}
    wait_until(lambda: learned_labels(service) == wanted)
    assert segmenter.threads == ["fastsam-learn"]
    health = wait_until(lambda: (h := client.get("/health").json["learning"])["learned"] and h)
    assert health["pending"] == 0 and health["last"]["examples_per_label"] == wanted
    assert health["last"]["examples"] == len(body["annotation"]["result"])


def test_a_bad_payload_is_still_a_400_and_deletions_answer_their_summary(learning_app):
    client, service, segmenter = learning_app()
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {}})
    assert r.status_code == 400 and "annotation.id" in r.json["error"]
    segmenter.release.set()
    client.post("/webhook", json=EVENTS[0])
    wait_until(lambda: learned_labels(service))
    r = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": int(PROJECT)},
                                      "annotations": [{"id": EVENTS[0]["annotation"]["id"]}]})
    assert r.status_code == 201 and r.json["result"]["deleted"] == 1 and r.json["result"]["examples_per_label"] == {}


def test_the_same_event_delivered_twice_is_learned_once(learning_app):
    client, service, segmenter = learning_app()
    first = client.post("/webhook", json=EVENTS[0]).json["result"]
    again = client.post("/webhook", json=EVENTS[0]).json["result"]
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    segmenter.release.set()
    wait_until(lambda: client.get("/health").json["learning"]["learned"])
    assert client.post("/webhook", json=EVENTS[0]).json["result"]["duplicate"]  # after it was learned too
    assert service.learner.store.revision(PROJECT) == 1 and segmenter.calls == 1
    health = client.get("/health").json["learning"]
    assert (health["accepted"], health["duplicate"], health["learned"]) == (1, 2, 1)


def test_a_full_backlog_is_a_503_and_nothing_is_lost_silently(learning_app, caplog):
    client, _, segmenter = learning_app(learn_backlog=1)
    assert client.post("/webhook", json=EVENTS[0]).status_code == 202
    assert segmenter.entered.wait(30)  # the first one is being learned: the backlog is empty again
    assert client.post("/webhook", json=EVENTS[1]).status_code == 202  # waits
    r = client.post("/webhook", json=EVENTS[2])
    assert r.status_code == 503 and "LEARN_BACKLOG" in r.json["error"]
    assert any("NOT learned" in rec.message for rec in caplog.records)
    segmenter.release.set()
    wait_until(lambda: client.get("/health").json["learning"]["learned"] == 2)
    assert client.post("/webhook", json=EVENTS[2]).status_code == 202  # Label Studio's next delivery of it
    wait_until(lambda: client.get("/health").json["learning"]["learned"] == 3)
    assert client.get("/health").json["learning"]["refused"] == 1


def test_a_deletion_that_overtakes_a_queued_create_wins(learning_app):
    client, service, segmenter = learning_app()
    client.post("/webhook", json=EVENTS[0])
    ann = EVENTS[0]["annotation"]["id"]
    r = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": int(PROJECT)},
                                      "annotations": [{"id": ann}]})
    assert r.status_code == 201 and r.json["result"]["deleted"] == 0  # not stored yet
    segmenter.release.set()
    wait_until(lambda: client.get("/health").json["learning"]["learned"])
    assert learned_labels(service) == {} and service.learner.store.count(PROJECT) == 0


def test_the_queued_event_keeps_only_what_is_parsed_and_keys_by_update_time():
    import json
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "ls-webhooks" / "ls-1.23.2-webhook-learn-ANNOTATION_UPDATED.json"
    body = json.loads(path.read_text())
    slim = slim_event(body)
    assert "task_data_password" in body["project"] and "task_data_password" not in slim["project"]
    full, kept = parse_event(body["action"], body), parse_event(body["action"], slim)
    assert (full.project, full.label_config) == (kept.project, kept.label_config)
    assert [(a.id, a.task_id, a.task_data, a.cancelled) for a in full.annotations] == [
        (a.id, a.task_id, a.task_data, a.cancelled) for a in kept.annotations]
    assert all(np.array_equal(x.mask, y.mask) and x.label == y.label
               for a, b in zip(full.annotations, kept.annotations) for x, y in zip(a.regions, b.regions))
    key = event_key("1", body["action"], body)
    assert key == event_key("1", body["action"], {**body, "project": {"id": 1}})  # the same annotation save
    later = {**body, "annotation": {**body["annotation"], "updated_at": "2027-01-01T00:00:00Z"}}
    assert key != event_key("1", body["action"], later) != event_key("1", "ANNOTATION_CREATED", later)


# ------------------------------------------------------------------ issue #16: the click path
class CountingClient:
    """A redis client that counts GETs (the revision read) and passes everything on."""

    def __init__(self, client) -> None:
        self.client, self.gets = client, 0

    def get(self, *args, **kwargs):
        self.gets += 1
        return self.client.get(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


class ClipOnly:
    def __init__(self) -> None:
        self.clip = ColourClip()


def test_a_warm_click_reads_no_revision_and_another_process_is_seen_after_the_refresh(own_redis):
    counting = CountingClient(own_redis.raw())
    learner = Learner(ClipOnly(), RedisExamples(counting, "memo:"), LearnConfig(min_examples=1, refresh_s=2.0))
    now = [100.0]
    learner.clock = lambda: now[0]
    other = RedisExamples(own_redis.raw(), "memo:")  # another replica or worker, same Redis
    other.put("p", AnnotationExamples("1", "7", "colour-clip", (Example("a", np.float32([1, 0, 0])),)))
    assert learner.model_for("p").labels == ("a",) and counting.gets == 1
    other.put("p", AnnotationExamples("2", "8", "colour-clip", (Example("b", np.float32([0, 1, 0])),)))
    now[0] += 1.9
    assert learner.model_for("p").labels == ("a",) and counting.gets == 1  # within LEARN_REFRESH_S: no GET
    now[0] += 0.2
    assert learner.model_for("p").labels == ("a", "b") and counting.gets == 2
    learner.learn(parse_event("ANNOTATIONS_DELETED", {"project": {"id": "p"}, "annotations": [{"id": "1"}]}))
    assert learner.model_for("p").labels == ("b",)  # this process learned (a deletion): seen at once


# ------------------------------------------------------------------ the RQ path, a real worker process
@pytest.mark.slow
@pytest.mark.model
def test_a_learn_job_runs_on_a_worker_process_once(make_settings, fastsam_weights, own_redis, tmp_path):
    from fastsam_backend.jobs.queues import JobQueues, QueueConfig
    from fastsam_backend.quality import lsrequests
    from tests.test_workers import REPO, log_tail, start, stop

    clip = {"OPEN_CLIP_MODEL": str(MODELS / "clip-shapes.json"), "OPEN_CLIP_PRETRAINED": str(MODELS / "clip-shapes.pt")}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTSAM_", "REDIS_", "LABEL_STUDIO", "CACHE_", "QUEUE_", "JOB_", "LEARN_"))}
    env.update({"FASTSAM_WEIGHTS": str(fastsam_weights), "IMGSZ": str(FIXTURE_IMGSZ), "CONF": str(FIXTURE_CONF),
                "IOU": "0.7", "FASTSAM_ALLOW_DOWNLOAD": "false", "MODEL_DIR": str(tmp_path),
                "REDIS_URL": own_redis.url, "CACHE_PREFIX": "learnjob:", "LEARN_MIN_EXAMPLES": "1",
                "JOB_RETRY_INTERVALS": "1", "TORCH_THREADS": "1", "YOLO_OFFLINE": "1", "PYTHONPATH": str(REPO),
                **clip})
    settings = make_settings(redis_url=own_redis.url, cache_prefix="learnjob:", learn_min_examples=1,
                             open_clip_model=clip["OPEN_CLIP_MODEL"], open_clip_pretrained=clip["OPEN_CLIP_PRETRAINED"])
    segmenter = GroundTruthSegmenter()  # the server must never segment: the worker does
    service = build_service(settings, segmenter)
    client = create_app(settings, service).test_client()
    queues = JobQueues(QueueConfig.from_settings(settings))
    worker = start(["worker"], env, tmp_path / "worker.log")
    try:
        wait_until(lambda: queues.connection.scard("rq:workers") >= 1 or worker.poll() is not None, 180)
        assert worker.poll() is None, log_tail(tmp_path)
        body = {**EVENTS[0], "task": {**EVENTS[0]["task"], "data": {"image": lsrequests.data_uri(scenes()[0].image)}}}
        first = client.post("/webhook", json=body)
        assert first.status_code == 202 and first.json["result"]["background"] == "job", first.json
        job_id = first.json["result"]["job_id"]
        assert client.post("/webhook", json=body).json["result"] == {**first.json["result"], "duplicate": True}
        state = wait_until(lambda: (s := queues.states([job_id])[0]).status in ("finished", "failed") and s, 120)
        assert state.status == "finished", (state, log_tail(tmp_path))
        assert state.result["learned"] and state.result["examples"] == len(body["annotation"]["result"])
        assert client.post("/webhook", json=body).json["result"]["duplicate"]  # finished: still not redone
        assert segmenter.calls == 0
        service.learner.clock = lambda: time.monotonic() + 10  # past LEARN_REFRESH_S: the worker's examples
        assert learned_labels(service) == state.result["examples_per_label"] != {}
        assert queues.connection.hget(queues.config.stats_key, "learn:learned") == b"1"
    finally:
        stop(worker)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_buried_annotation_is_not_stored_again(kind, request):
    from fastsam_backend.labels.example_store import MemoryExamples

    store = MemoryExamples() if kind == "memory" else RedisExamples(request.getfixturevalue("own_redis").raw(), "t:")
    item = AnnotationExamples("1", "7", "colour-clip", (Example("a", np.float32([1, 0, 0])),))
    store.put("p", item)
    store.bury("p", ["1"])
    assert store.delete("p", ["1"]) == 1
    rev = store.revision("p")
    assert store.put("p", item) == rev and store.load("p", "colour-clip") == [] and store.count("p") == 0
    store.put("q", item)  # the same id in another project is another annotation
    assert store.count("q") == 1
