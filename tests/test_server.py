"""The HTTP protocol through Flask's test client, over the scenes' ground-truth masks (the model's
masks are judged in test_quality and through gunicorn in test_e2e_gunicorn)."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle as sdk_decode_rle

from fastsam_backend.quality.fake import GroundTruthSegmenter
from fastsam_backend.quality.scenes import generate_scene
from fastsam_backend.server import create_app
from fastsam_backend.service.orchestrator import build_service
from tests.conftest import FIXTURE_IMGSZ, MODELS
from tests.helpers import LABEL_CONFIG, captured, interior_point, keypoint, png_bytes

SEED = 1_000_007


@pytest.fixture(scope="module")
def scene():
    return generate_scene(SEED, (320, 240))




@pytest.fixture(scope="module")
def served_scene(image_server, scene):
    root, base = image_server
    (root / "data" / "upload" / "1").mkdir(parents=True, exist_ok=True)
    (root / "data" / "upload" / "1" / "scene.png").write_bytes(png_bytes(scene.image))
    return base, "/data/upload/1/scene.png"


def gt_app(settings, *scenes):
    """The app over a service whose segmenter answers with these scenes' ground truth."""
    return create_app(settings, build_service(settings, GroundTruthSegmenter(scenes)))


@pytest.fixture(scope="module")
def client(make_settings, served_scene, scene):
    base, _ = served_scene
    # no CLIP here (its default weights are not on disk): pre-annotation labels come from DEFAULT_LABEL
    settings = make_settings(label_studio_url=base, label_studio_api_key="0123456789abcdef" * 2 + "01234567",
                             default_label="Banana")
    return gt_app(settings, scene).test_client()


def interactive_body(url, region):
    body = captured("/predict", interactive=True)
    body["tasks"][0]["data"]["image"] = url
    body["params"]["context"]["result"] = [region]
    return body


def metric(client, name, **labels) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{sel}\}} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_health_and_setup_do_not_load_the_model(make_settings):
    client = create_app(make_settings()).test_client()  # the real segmenter, never loaded here
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json["status"] == "UP" and health.json["model_class"] == "FastSAMBackend"
    assert health.json["ready"] is True
    setup = client.post("/setup", json=captured("/setup"))
    assert setup.status_code == 200
    version = setup.json["model_version"]
    assert version.startswith(Path(make_settings().fastsam_weights).stem) and f"i{FIXTURE_IMGSZ}" in version
    assert client.get("/").json["model_loaded"] is False


def test_weights_are_digested_at_start_up_not_on_the_first_health(make_settings, monkeypatch):
    """LS waits 1 s for /health; hashing a 600 MB CLIP checkpoint there could miss it."""
    from fastsam_backend.models import clip, segmenter

    app = create_app(make_settings(open_clip_model=str(MODELS / "clip-shapes.json"),
                                   open_clip_pretrained=str(MODELS / "clip-shapes.pt")))

    def no_hashing(*paths, **kwargs):
        raise AssertionError(f"hashed {paths} while serving")

    monkeypatch.setattr(segmenter, "file_digest", no_hashing)
    monkeypatch.setattr(clip, "file_digest", no_hashing)
    health = app.test_client().get("/health")
    assert health.status_code == 200 and "clip-shapes-" in health.json["model_version"]


def test_click_returns_the_brush_mask_and_repeats_hit_the_cache(client, served_scene, scene):
    _, url = served_scene
    h, w = scene.image.shape[:2]
    target = max(scene.objects, key=lambda o: o.mask.sum())
    x, y = interior_point(target.mask)
    body = interactive_body(url, keypoint(x, y, w, h))
    hits_before = metric(client, "fastsam_cache_lookups_total", result="hit")

    first = client.post("/predict", json=body)
    assert first.status_code == 200, first.json
    results = first.json["results"]
    assert len(results) == 1
    regions = results[0]["result"]
    assert len(regions) == 1
    region = regions[0]
    assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
    assert region["value"]["brushlabels"] == ["Banana"]
    assert (region["original_width"], region["original_height"]) == (w, h)
    mask = sdk_decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 0] > 0
    assert mask[y, x], "the clicked pixel must be inside the returned mask"
    assert results[0]["model_version"]

    again = client.post("/predict", json=body)
    assert again.status_code == 200
    assert again.json["results"][0]["result"][0]["value"]["rle"] == region["value"]["rle"]
    assert metric(client, "fastsam_cache_lookups_total", result="hit") == hits_before + 1


def test_batch_gives_exactly_one_result_per_task(client, served_scene):
    _, url = served_scene
    body = captured("/predict", interactive=False)
    body["tasks"] = [{"id": i, "data": {"image": url}} for i in range(3)]
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    assert len(response.json["results"]) == 3
    for prediction in response.json["results"]:
        assert {"result", "score", "model_version"} <= set(prediction)


def test_a_batch_keeps_the_tasks_whose_images_load(client, served_scene, caplog):
    """LS stores one prediction per entry that has a "result", logs the others and retries those
    tasks next run: one broken image must not cost the batch its other predictions."""
    _, url = served_scene
    body = captured("/predict", interactive=False)
    body["tasks"] = [{"id": 7, "data": {"image": url}}, {"id": 8, "data": {"image": "/data/upload/1/gone.png"}},
                     {"id": 9, "data": {}}, {"id": 10, "data": {"image": url}}]
    before = metric(client, "fastsam_batch_tasks_total", outcome="failed")
    with caplog.at_level(logging.WARNING, logger="fastsam_backend.service"):
        response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == 4
    assert results[0]["result"] and [r["value"] for r in results[3]["result"]] == \
        [r["value"] for r in results[0]["result"]]
    assert "result" not in results[1] and re.search(r"tasks\[1\] \(id 8\): .*127\.0\.0\.1.*404", results[1]["error"])
    assert "result" not in results[2]
    assert re.search(r"tasks\[2\] \(id 9\): tasks\[2\]\.data\.image", results[2]["error"])
    assert metric(client, "fastsam_batch_tasks_total", outcome="failed") == before + 2
    assert any("tasks[1] (id 8) skipped" in r.getMessage() for r in caplog.records)


def test_a_batch_past_its_time_budget_returns_what_it_has(make_settings, served_scene, scene):
    """LS drops a /predict that takes over 100 s, with every prediction in it: the batch stops
    starting tasks once BATCH_TIME_BUDGET_S is spent, and LS sends the rest again next run."""
    base, url = served_scene
    settings = make_settings(label_studio_url=base, batch_time_budget_s=1e-6, default_label="Banana")
    client = gt_app(settings, scene).test_client()
    body = captured("/predict", interactive=False)
    body["tasks"] = [{"id": 20 + i, "data": {"image": url}} for i in range(3)]
    before = metric(client, "fastsam_batch_tasks_total", outcome="deferred")
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    first, *rest = response.json["results"]
    assert first["result"] and len(rest) == 2  # the first task always runs
    for i, entry in enumerate(rest, start=1):
        assert "result" not in entry
        assert entry["error"].startswith(f"tasks[{i}] (id {20 + i}): not started")
        assert "BATCH_TIME_BUDGET_S" in entry["error"]
    assert metric(client, "fastsam_batch_tasks_total", outcome="deferred") == before + 2
    # the retry: LS sends the two that are left
    body["tasks"] = body["tasks"][1:]
    app2 = gt_app(make_settings(label_studio_url=base, batch_time_budget_s=60, default_label="Banana"), scene)
    results = app2.test_client().post("/predict", json=body).json["results"]
    assert all(r["result"] for r in results)


def test_a_batch_where_every_image_fails_answers_each_reason_and_health_keeps_them(client):
    """Label Studio logs a non-2xx answer's status line only, but each error entry of a 200 whole
    (ml/models.py: "ML backend returns an incorrect prediction ..."), and stores nothing for them."""
    body = captured("/predict", interactive=False)
    body["tasks"] = [{"id": i, "data": {"image": f"/data/upload/1/gone-{i}.png"}} for i in range(2)]
    before = client.get("/health").json["recent_failures"]["count"]
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    errors = [r["error"] for r in response.json["results"]]
    assert all("result" not in r for r in response.json["results"])
    assert re.search(r"^tasks\[0\] \(id 0\): .*404", errors[0]) and errors[1].startswith("tasks[1] (id 1)")
    failures = client.get("/health").json["recent_failures"]
    assert failures["count"] == before + 2
    assert [f["task"] for f in failures["last"][:2]] == [1, 0] and failures["last"][0]["error"] == errors[1]
    assert failures["last"][0]["status"] == 422


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"not json", 400, "JSON object"),
        ({"tasks": []}, 400, "tasks must be a non-empty list"),
        ({"tasks": "x.png"}, 400, r"\$\.tasks"),
        ({"tasks": [1]}, 400, r"\$\.tasks\[0\]"),
        # a label config that is not a string was a 500 (it reached an lru_cache unhashed)
        ({"tasks": [{"data": {"image": "/x.png"}}], "label_config": {"a": 1}}, 400, r"`str \| null`.*\$\.label_config"),
        ({"tasks": [{"data": {"image": "/x.png"}}], "label_config": ["<View/>"]}, 400, r"\$\.label_config"),
        ({"tasks": [{"data": {"image": "/x.png"}}], "label_config": 7}, 400, r"\$\.label_config"),
        ({"tasks": [{"data": {"image": "/x.png"}}], "params": "x"}, 400, r"\$\.params"),
        ({"tasks": [{"data": {"image": "/x.png"}}], "params": {"context": []}}, 400, r"\$\.params\.context"),
        ({"tasks": [{"data": "x.png"}]}, 400, r"\$\.tasks\[0\]\.data"),
        ({"tasks": [{"data": {"image": "/x.png"}}], "project": {"id": 1}}, 400, r"\$\.project"),
        ([{"data": {}}], 400, "JSON object"),
        (b'{"tasks": [', 400, "JSON object"),
        ({"tasks": [{"data": {}}], "label_config": LABEL_CONFIG}, 400, r"tasks\[0\].data.image"),
        ({"tasks": [{"data": {"image": "/x.png"}}], "label_config": "<View"}, 400, "not valid XML"),
        ({"tasks": [{"data": {"image": "/x.png"}}], "label_config": LABEL_CONFIG,
          "params": {"context": {"result": [{"type": "keypointlabels", "value": {"x": "a", "y": 1}}]}}},
         400, r"context.result\[0\].value.x"),
        ({"tasks": [{"data": {"image": "/data/upload/1/missing.png"}}], "label_config": LABEL_CONFIG},
         422, "127.0.0.1.*404"),
    ],
)
def test_bad_input_gives_a_json_4xx_and_the_server_keeps_serving(client, body, status, message):
    kwargs = {"data": body, "content_type": "application/json"} if isinstance(body, bytes) else {"json": body}
    response = client.post("/predict", **kwargs)
    assert response.status_code == status
    assert re.search(message, response.json["error"]), response.json
    assert response.json["request_id"]
    assert client.get("/health").status_code == 200


def test_predict_reads_tasks_without_their_annotations(client, monkeypatch):
    service = client.application.extensions["fastsam_service"]
    seen = {}

    def predict(request):
        seen["tasks"] = [(t.id, t.data) for t in request.tasks]
        return [{"result": [], "score": 0.0, "model_version": "v"}]

    monkeypatch.setattr(service, "predict", predict)
    task = {"id": 7, "data": {"image": "/x.png"}, "annotations": [{"result": [{"value": {"rle": [1] * 1000}}]}],
            "predictions": [{"result": []}], "meta": {"a": 1}}
    response = client.post("/predict", json={"tasks": [task], "label_config": LABEL_CONFIG})
    assert response.status_code == 200
    assert seen["tasks"] == [(7, {"image": "/x.png"})]


def test_predict_needs_a_json_content_type(client):
    response = client.post("/predict", data=b'{"tasks": []}', content_type="text/plain")
    assert response.status_code == 400 and "Content-Type" in response.json["error"]


def test_errors_never_carry_the_token(client, caplog):
    caplog.set_level(logging.DEBUG)
    body = {"tasks": [{"data": {"image": "/data/upload/1/missing.png"}}], "label_config": LABEL_CONFIG}
    response = client.post("/predict", json=body)
    token = "0123456789abcdef" * 2 + "01234567"
    assert token not in response.get_data(as_text=True)
    assert token not in caplog.text


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").json
    assert client.get("/predict").status_code == 405


def test_webhook(client):
    trained = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert trained.status_code == 201 and trained.json["status"] == "ok"
    other = client.post("/webhook", json={"action": "PROJECT_UPDATED"})
    assert other.status_code == 200 and other.json["status"] == "Unknown event"


def test_metrics_are_prometheus_text(client):
    client.get("/health")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'fastsam_requests_total{method="GET",route="/health",status="200"}' in text
    assert "fastsam_request_seconds_bucket" in text


def test_missing_weights_is_a_503_with_how_to(make_settings, served_scene):
    base, url = served_scene
    app = create_app(make_settings(fastsam_weights="FastSAM-x.pt", label_studio_url=base))
    client = app.test_client()
    health = client.get("/health").json
    assert health["ready"] is False and "FastSAM-x.pt" in health["error"]
    body = interactive_body(url, keypoint(10, 10, 320, 240))
    response = client.post("/predict", json=body)
    assert response.status_code == 503
    assert "FastSAM-x.pt" in response.json["error"] and "FASTSAM_WEIGHTS" in response.json["error"]
    assert client.get("/health").status_code == 200


def test_basic_auth(make_settings):
    app = create_app(make_settings(basic_auth_user="ls", basic_auth_pass="s3cret"))
    client = app.test_client()
    assert client.get("/health").status_code == 200  # probes need no credentials
    denied = client.post("/setup", json=captured("/setup"))
    assert denied.status_code == 401 and "WWW-Authenticate" in denied.headers
    wrong = base64.b64encode(b"ls:nope").decode()
    assert client.post("/setup", json={}, headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    good = base64.b64encode(b"ls:s3cret").decode()
    assert client.post("/setup", json=captured("/setup"), headers={"Authorization": f"Basic {good}"}).status_code == 200


def test_model_py_backend_class(make_settings, served_scene, scene):
    import model

    base, url = served_scene
    settings = make_settings(label_studio_url=base)
    backend = model.FastSAMBackend(project_id="1", label_config=LABEL_CONFIG,
                                   service=build_service(settings, GroundTruthSegmenter([scene])))
    h, w = scene.image.shape[:2]
    x, y = interior_point(scene.objects[0].mask)
    response = backend.predict([{"id": 1, "data": {"image": url}}],
                               context={"result": [keypoint(x, y, w, h)]})
    assert response["model_version"] == backend.model_version
    assert len(response["predictions"]) == 1
    assert backend.fit("START_TRAINING", {})["trained"] is False
    assert np.isfinite(response["predictions"][0]["score"])


def test_setup_extra_params_override_per_project(client):
    body = captured("/setup")
    body["extra_params"] = {"point_rule": "paper", "preannotate_max_instances": 2, "unrelated": 1}
    assert client.post("/setup", json=body).status_code == 200
    options = client.application.extensions["fastsam_service"].options_for(body["project"])
    assert options.point_rule.value == "paper" and options.preannotate_max_instances == 2
    other = client.application.extensions["fastsam_service"].options_for("999.1")
    assert other.point_rule.value == "smallest"


@pytest.mark.parametrize(("extra", "field"), [
    ({"point_rule": "largest"}, "extra_params.point_rule"),
    ({"preannotate_max_instances": 0}, "extra_params.preannotate_max_instances"),
    ("yes", "Expected `object | null`, got `str` - at `$.extra_params`"),
])
def test_setup_rejects_bad_extra_params(client, extra, field):
    body = captured("/setup")
    body["extra_params"] = extra
    response = client.post("/setup", json=body)
    assert response.status_code == 400 and field in response.json["error"]


def test_text_prompt_without_clip_is_a_clear_503(make_settings, served_scene, scene):
    base, url = served_scene
    client = gt_app(make_settings(label_studio_url=base, clip_enabled=False), scene).test_client()
    body = interactive_body(url, {"type": "textarea", "from_name": "prompt", "value": {"text": ["a red circle"]}})
    response = client.post("/predict", json=body)
    assert response.status_code == 503 and "CLIP" in response.json["error"]


def test_interactive_needs_a_brush_or_polygon_tag(client, served_scene):
    """Polygon-only configs get polygon answers (issue #15); a config with neither tag is a 400."""
    _, url = served_scene
    body = interactive_body(url, keypoint(5, 5, 320, 240))
    body["label_config"] = '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image"/></View>'
    response = client.post("/predict", json=body)
    assert response.status_code == 400 and "BrushLabels or PolygonLabels" in response.json["error"]


def test_responses_carry_the_request_id_and_the_app_time(client):
    response = client.get("/health", headers={"X-Request-Id": "abc123"})
    assert response.headers["X-Request-Id"] == "abc123"
    name, dur = response.headers["Server-Timing"].split(";")
    assert name == "app" and float(dur.removeprefix("dur=")) >= 0


ONE_LABEL_CONFIG = LABEL_CONFIG.replace('<Label value="Banana"/><Label value="Orange"/></BrushLabels>',
                                        '<Label value="Banana"/></BrushLabels>', 1)


def test_pre_annotation_without_clip_never_guesses_labels(make_settings, served_scene, scene, caplog):
    """Without CLIP, every instance labelled with the first label read as wrong labels. Now: one label
    is that label; DEFAULT_LABEL when set; otherwise an error entry per task naming both fixes."""
    base, url = served_scene
    client = gt_app(make_settings(label_studio_url=base), scene).test_client()
    assert client.get("/health").json["zero_shot_labels"].startswith("off: ")
    body = captured("/predict", interactive=False)
    body["tasks"] = [{"id": i, "data": {"image": url}} for i in range(2)]
    body["label_config"] = LABEL_CONFIG
    response = client.post("/predict", json=body)
    assert response.status_code == 200  # every task failed: each says why
    assert all("DEFAULT_LABEL" in r["error"] and "CLIP" in r["error"] for r in response.json["results"])
    body["tasks"].append({"id": 9, "data": {"image": "/data/upload/1/gone.png"}})
    entries = client.post("/predict", json={**body, "tasks": body["tasks"][:1] + body["tasks"][2:]}).json
    assert all("error" in r for r in entries["results"])  # one task's label failure and a missing image
    one = client.post("/predict", json={**body, "tasks": body["tasks"][:1]})
    assert one.status_code == 503 and "DEFAULT_LABEL" in one.json["error"]  # a single task: the error
    body["label_config"] = ONE_LABEL_CONFIG
    results = client.post("/predict", json=body).json["results"]
    assert {lab for r in results[0]["result"] for lab in r["value"]["brushlabels"]} == {"Banana"}
    assert len(results[0]["result"]) == len(scene.objects)
    body["label_config"] = LABEL_CONFIG
    client.post("/setup", json={**captured("/setup"), "project": "41.1", "extra_params": {"default_label": "Orange"}})
    results = client.post("/predict", json={**body, "project": "41.1"}).json["results"]
    assert {lab for r in results[0]["result"] for lab in r["value"]["brushlabels"]} == {"Orange"}


def test_model_version_is_a_function_of_the_configuration_per_project(make_settings, served_scene, scene):
    base, url = served_scene
    settings = make_settings(label_studio_url=base, default_label="Banana")
    client = gt_app(settings, scene).test_client()
    setup = captured("/setup")
    default = client.post("/setup", json=setup).json["model_version"]
    assert default == client.post("/setup", json={**setup, "project": "2.5"}).json["model_version"]
    changed = client.post("/setup", json={**setup, "project": "3.1",
                                          "extra_params": {"preannotate_max_instances": 3}}).json["model_version"]
    assert changed != default and changed.startswith(default)
    rule = client.post("/setup", json={**setup, "project": "4.1", "extra_params": {"point_rule": "paper"}})
    assert rule.json["model_version"] not in {default, changed}
    body = captured("/predict", interactive=False)
    body["tasks"] = [{"id": 1, "data": {"image": url}}]
    assert client.post("/predict", json={**body, "project": "3.1"}).json["results"][0]["model_version"] == changed
    assert client.post("/predict", json={**body, "project": "2.9"}).json["results"][0]["model_version"] == default
    # a restart with the same files and settings: the same versions
    again = gt_app(settings, scene).test_client()
    assert again.post("/setup", json={**setup, "project": "3.1", "extra_params": {"preannotate_max_instances": 3}}
                      ).json["model_version"] == changed


def test_model_version_does_not_depend_on_whether_clip_loaded(make_settings):
    from fastsam_backend.service.orchestrator import build_service as real_service

    configured = make_settings(open_clip_model=str(MODELS / "clip-shapes.json"),
                               open_clip_pretrained=str(MODELS / "missing.pt"))
    service = real_service(configured)
    before = service.model_version
    assert service.models.zero_shot_unavailable() is not None  # configured, but cannot load
    assert service.model_version == before and "+clip-" in before
    released = real_service(make_settings(fastsam_weights="FastSAM-s.pt"))
    assert released.model_version.startswith("FastSAM-s-i")  # a release is named, downloaded or not


@pytest.fixture()
def fake_ls():
    """A Label Studio stand-in for the token check: whoami answers ``status[0]``; counts calls."""
    import http.server
    import threading

    state = {"status": 401, "calls": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["calls"] += 1
            self.send_response(state["status"])
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"detail": "nope"}' if state["status"] != 200 else b'{"id": 1}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()


def test_setup_says_when_label_studio_refuses_the_token(make_settings, fake_ls, scene, caplog):
    """LS 1.23 disables legacy tokens for new organisations; every click then returned nothing and LS
    swallowed our 422. /setup (LS's "Validate and Save") now names the fix."""
    base, state = fake_ls
    token = "f" * 40
    client = gt_app(make_settings(label_studio_url=base, label_studio_api_key=token), scene).test_client()
    refused = client.post("/setup", json=captured("/setup"))
    assert refused.status_code == 422
    assert "personal access token" in refused.json["error"] and "Legacy Tokens" in refused.json["error"]
    assert "Personal Access Token" in refused.status  # the reason phrase LS shows on Validate and Save
    assert token not in refused.get_data(as_text=True) and token not in caplog.text
    assert "refused the legacy token" in caplog.text
    client.post("/setup", json=captured("/setup"))
    assert state["calls"] == 1  # cached per host and token
    state["status"] = 200
    accepted = gt_app(make_settings(label_studio_url=base, label_studio_api_key=token), scene).test_client()
    assert accepted.post("/setup", json=captured("/setup")).status_code == 200
