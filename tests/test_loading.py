"""Models load in the background at start-up, and an offline machine is told at once.

Before: the first request after a start loaded the models (6-15 s), and with the default CLIP
settings on a machine without network it waited ~47 s in download retries, freezing the
labeling UI that had called /predict.
"""

from __future__ import annotations

import socket
import time

import pytest

from fastsam_backend.errors import ModelUnavailable
from fastsam_backend.quality.fake import GroundTruthSegmenter
from fastsam_backend.server import create_app
from fastsam_backend.service.orchestrator import build_service


@pytest.fixture()
def no_sockets(monkeypatch):
    """Any connection attempt fails the test (name lookups too)."""
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise AssertionError(f"connected to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or (_ for _ in ()).throw(
        AssertionError(f"looked up {a[0]}")))
    return attempts


def test_with_downloads_off_nothing_is_contacted_and_clip_says_which_setting(make_settings, no_sockets):
    service = build_service(make_settings(fastsam_weights="FastSAM-s.pt"))  # released name, not on disk
    service.models.load_all()  # what the background thread runs
    why = service.models.zero_shot_unavailable()
    assert no_sockets == []
    assert "FASTSAM_ALLOW_DOWNLOAD=false" in why and "OPEN_CLIP_PRETRAINED" in why
    assert service.models.state()["state"] == "error" and "FastSAM-s.pt" in service.models.state()["error"]
    assert service.models.state()["zero_shot_labels"].startswith("off: ")


def test_with_downloads_on_an_unreachable_hub_fails_within_the_deadline(make_settings, monkeypatch):
    from fastsam_backend.models import reach

    monkeypatch.setattr(reach, "REACH_DEADLINE_S", 1.0)
    probed: list[str] = []
    real_head = __import__("requests").head

    def head(url, **kwargs):
        probed.append(url)
        assert kwargs["timeout"] == (0.5, 0.5)
        return real_head("http://127.0.0.1:9/", **kwargs)  # nothing listens there: refused at once

    monkeypatch.setattr("requests.head", head)
    service = build_service(make_settings(fastsam_weights="FastSAM-s.pt", allow_download=True))
    with pytest.raises(ModelUnavailable, match=r"did not answer within 1 s.*FASTSAM_ALLOW_DOWNLOAD=false"):
        service.segmenter.load()
    with pytest.raises(ModelUnavailable, match=r"CLIP weights 'openai'.*OPEN_CLIP_PRETRAINED"):
        service.clip.load()
    assert len(probed) == 2  # one look each, no download retries


def test_health_answers_during_the_load_and_requests_wait_for_it(make_settings, monkeypatch):
    settings = make_settings(load_on_start=True, load_wait_s=5, default_label="Banana")
    segmenter = GroundTruthSegmenter()
    release = __import__("threading").Event()
    monkeypatch.setattr(segmenter, "load", lambda: release.wait(10))
    app = create_app(settings, build_service(settings, segmenter))
    client = app.test_client()
    health = client.get("/health").json  # answered while the load holds
    assert health["state"] == "loading" and health["status"] == "UP"
    assert client.post("/setup", json={"project": "1.1"}).status_code == 200  # never waits for models
    __import__("threading").Timer(0.3, release.set).start()
    from fastsam_backend.quality.lsrequests import data_uri

    body = {"tasks": [{"id": 1, "data": {"image": data_uri(__import__("numpy").zeros((8, 8, 3), "uint8"))}}],
            "label_config": __import__("tests.helpers", fromlist=["LABEL_CONFIG"]).LABEL_CONFIG}
    response = client.post("/predict", json=body)  # waited for the load, then answered
    assert response.status_code == 200 and release.is_set()
    assert client.get("/health").json["state"] == "ready"


def test_the_batch_budget_counts_task_work_not_the_load(make_settings, monkeypatch):
    """A batch that arrives during the start-up load waits for it, then gets its whole budget: the
    one-off wait cut a batch after 51 s of its 80 before."""
    import threading

    import numpy as np

    from fastsam_backend.quality.lsrequests import LABEL_CONFIG, data_uri

    settings = make_settings(load_on_start=True, batch_time_budget_s=0.3, default_label="Banana")
    segmenter, loaded = GroundTruthSegmenter(), threading.Event()
    monkeypatch.setattr(segmenter, "load", lambda: loaded.wait(0.6) or loaded.set())  # longer than the budget
    segment = segmenter.segment
    monkeypatch.setattr(segmenter, "segment", lambda pixels: loaded.wait(5) and segment(pixels))  # as the model
    client = create_app(settings, build_service(settings, segmenter)).test_client()
    tasks = [{"id": i, "data": {"image": data_uri(np.full((8, 8, 3), i, np.uint8))}} for i in range(3)]
    results = client.post("/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG}).json["results"]
    assert [("result" in r) for r in results] == [True, True, True], results


def _slow_images(service, seconds: float, gate=None):
    """The service's image loader, each load taking ``seconds``; records how many ran at once."""
    import threading

    real_load, state = service.images.load, {"now": 0, "most": 0}
    lock = threading.Lock()

    def load(url):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(seconds)
        with lock:
            state["now"] -= 1
        return real_load(url)

    service.images.load = load
    return state


def _tasks(n: int):
    import numpy as np

    from fastsam_backend.quality.lsrequests import data_uri

    return [{"id": i, "data": {"image": data_uri(np.full((8, 8, 3), i, np.uint8))}} for i in range(n)]


def test_a_predict_past_its_deadline_is_a_504_naming_the_stage(make_settings):
    from fastsam_backend.quality.lsrequests import LABEL_CONFIG

    settings = make_settings(predict_deadline_s=0.2, default_label="Banana")
    service = build_service(settings, GroundTruthSegmenter())
    _slow_images(service, 0.4)
    client = create_app(settings, service).test_client()
    response = client.post("/predict", json={"tasks": _tasks(1), "label_config": LABEL_CONFIG})
    assert response.status_code == 504
    assert "PREDICT_DEADLINE_S=0.2" in response.json["error"] and "before segmenting" in response.json["error"]
    assert client.get("/health").status_code == 200


@pytest.mark.slow  # seconds of waiting: the full lane (make test), not make test-fast
def test_cold_images_queue_behind_max_cold_images(make_settings):
    """A burst of cold images is segmented MAX_COLD_IMAGES at a time; one that cannot get a slot
    before its deadline is a 504 saying so."""
    import threading

    from fastsam_backend.quality.lsrequests import LABEL_CONFIG

    settings = make_settings(max_cold_images=1, default_label="Banana")
    service = build_service(settings, GroundTruthSegmenter())
    state = _slow_images(service, 0.2)
    client = create_app(settings, service).test_client()
    statuses: list[int] = []

    def ask(task):
        statuses.append(client.post("/predict", json={"tasks": [task], "label_config": LABEL_CONFIG}).status_code)

    threads = [threading.Thread(target=ask, args=(t,)) for t in _tasks(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert statuses == [200] * 4 and state["most"] == 1
    hurried = make_settings(max_cold_images=1, predict_deadline_s=0.1, default_label="Banana")
    service = build_service(hurried, GroundTruthSegmenter())
    _slow_images(service, 0.5)
    client = create_app(hurried, service).test_client()
    first = threading.Thread(target=ask, args=(_tasks(1)[0],))
    first.start()
    time.sleep(0.05)
    second = client.post("/predict", json={"tasks": _tasks(2)[1:], "label_config": LABEL_CONFIG})
    first.join(5)
    assert second.status_code == 504 and "MAX_COLD_IMAGES=1" in second.json["error"]
