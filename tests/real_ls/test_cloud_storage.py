"""Images in S3 source storage (moto's S3-compatible server, ``s3server.py``), "Use pre-signed URLs"
on and off: Label Studio sends ``s3://`` URIs to ``/predict`` and serves them at
``/tasks/<id>/resolve/``, which the backend asks with its token (issue #23).

Per mode, one project with three scenes synced from the bucket and one task whose object is not
there: a click answers the object's mask, Retrieve Predictions stores one prediction per present
task and none for the missing one, a click on an image warmed by that fetches nothing from the
bucket, and the missing object's click names its fix. Then ``preannotate`` fills a project, and a
backend without ``OUTBOUND_ALLOW`` for the bucket's host says so.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from fastsam_backend.quality.evaluation import iou

from .cases import BOX, ENCLOSED, KEYPOINT, MAX_NEIGHBOUR_IOU, MIN_IOU, brush_masks, check_mask, keypoint
from .harness import ROOT, Backend, backend_env, tag_names, wait_until
from .s3server import CREDENTIALS, MotoS3

BUCKET = "fastsam-images"
SCENES = {c.file_name: c for c in (KEYPOINT, BOX, ENCLOSED)}
MISSING = "missing.png"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoS3.start(tmp_path_factory.mktemp("moto"))
    try:
        server.put(BUCKET)
        for name, case in SCENES.items():
            server.put(BUCKET, f"images/{name}", case.png())
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cloud_backend(label_studio, s3, tmp_path_factory):
    """Our backend, allowed to reach the bucket's host (a private S3-compatible server)."""
    be = Backend(tmp_path_factory.mktemp("cloud-backend"), label_studio, name="cloud-backend",
                 OUTBOUND_ALLOW=f"127.0.0.1:{s3.port}").start()
    try:
        yield be
    finally:
        be.stop()


def s3_project(api, s3: MotoS3, label_config: str, title: str, presign: bool) -> SimpleNamespace:
    """Settings → Cloud Storage → Add Source Storage (S3, this endpoint), Sync; plus a task whose
    object is not in the bucket (deleted after a sync)."""
    pid = api.create_project(title, label_config)
    storage = api.json("POST", "/api/storages/s3", json={
        "project": pid, "title": "moto", "bucket": BUCKET, "prefix": "images/", "regex_filter": r".*\.png",
        "use_blob_urls": True, "presign": presign, "presign_ttl": 15, "s3_endpoint": s3.endpoint, **CREDENTIALS})
    api.json("POST", f"/api/storages/s3/{storage['id']}/sync")
    api.json("POST", f"/api/projects/{pid}/import", json=[{"image": f"s3://{BUCKET}/images/{MISSING}"}])

    def by_name() -> dict[str, dict] | None:
        found = {uri_of(t).rsplit("/", 1)[-1]: t for t in api.tasks(pid)}
        return found if set(found) == {*SCENES, MISSING} else None

    tasks = wait_until(by_name, 120, "the synced tasks")
    assert all(uri_of(t).startswith(f"s3://{BUCKET}/images/") for t in tasks.values()), tasks
    return SimpleNamespace(id=pid, tasks=tasks, api=api)


def uri_of(task: dict) -> str:
    """The task's ``s3://`` URI: the API shows it as the resolve path Label Studio serves it at
    (``/predict`` gets the URI itself)."""
    shown = task["data"]["image"]
    query = parse_qs(urlsplit(shown).query)
    return base64.urlsafe_b64decode(query["fileuri"][0]).decode() if "fileuri" in query else shown


@pytest.fixture(scope="module", params=[True, False], ids=["presign", "proxied"])
def project(request, label_studio, s3, cloud_backend, label_config):
    presign = request.param
    found = s3_project(label_studio.api, s3, label_config, f"fastsam s3 {'presign' if presign else 'proxied'}",
                       presign)
    found.ml = label_studio.api.connect_ml(found.id, cloud_backend.url)
    found.names, found.presign = tag_names(label_config), presign
    return found


def click(project, name: str) -> dict:
    case = SCENES.get(name, KEYPOINT)
    return project.api.interactive(project.ml["id"], project.tasks[name]["id"], [keypoint(case, project.names)])


def test_a_click_on_an_s3_image_answers_its_mask(project):
    answer = click(project, KEYPOINT.file_name)
    assert "data" in answer, f"LS answered {str(answer)[:600]}"
    masks = brush_masks(answer["data"].get("result") or [])
    assert len(masks) == 1, str(answer)[:400]
    print(f"presign={project.presign}: {check_mask(masks[0], KEYPOINT)}")


def test_retrieve_predictions_stores_one_per_task_then_a_click_fetches_nothing(project, cloud_backend, s3):
    api = project.api
    api.retrieve_predictions(project.id)
    version = cloud_backend.health()["model_version"]
    for name, case in SCENES.items():
        predictions = api.predictions(project.tasks[name]["id"])
        assert len(predictions) == 1, f"{name}: {len(predictions)} predictions"
        assert predictions[0]["model_version"] == version
        masks = brush_masks(predictions[0]["result"])
        best = max(masks, key=lambda m: iou(m, case.obj.mask))
        assert iou(best, case.obj.mask) >= MIN_IOU and iou(best, case.other.mask) < MAX_NEIGHBOUR_IOU, case.describe()
    assert api.predictions(project.tasks[MISSING]["id"]) == []  # its error entry: logged by LS, nothing stored

    before = s3.gets(BUCKET, f"images/{BOX.file_name}")
    assert before >= 1  # the batch read it (through Label Studio, or a presigned URL)
    answer = project.api.interactive(project.ml["id"], project.tasks[BOX.file_name]["id"],
                                     [keypoint(BOX, project.names)])
    check_mask(brush_masks(answer["data"]["result"])[0], BOX)
    assert s3.gets(BUCKET, f"images/{BOX.file_name}") == before  # warm: keyed on the URI, nothing fetched
    failures = cloud_backend.health()["recent_failures"]
    assert any(f["task"] == project.tasks[MISSING]["id"] for f in failures["last"]), failures


def test_a_missing_object_names_its_fix(project):
    answer = click(project, MISSING)
    assert "data" not in answer or not answer["data"].get("result"), str(answer)[:600]
    errors = " ".join(answer.get("errors") or [])
    # presign on: the storage host's answer (moto: 403 SignatureDoesNotMatch for a missing key; S3: 404
    # NoSuchKey, or 403 to a signer that may not list the bucket); off: Label Studio's 424
    expected = "object missing or access denied at the storage (HTTP 403" if project.presign else \
        "object missing or unreadable in the storage (HTTP 424)"
    assert f"422 Client Error: s3://{BUCKET}/images/{MISSING}: {expected}" in errors, errors


def test_preannotate_fills_an_s3_project(label_studio, s3, label_config, tmp_path):
    api = label_studio.api
    found = s3_project(api, s3, label_config, "fastsam s3 preannotate", presign=True)
    env = backend_env(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.pat,
                      MODEL_DIR=str(tmp_path), CLIP_ENABLED="false", DEFAULT_LABEL="Banana", LOG_LEVEL="WARNING",
                      OUTBOUND_ALLOW=f"127.0.0.1:{s3.port}")
    run = subprocess.run([sys.executable, "-m", "fastsam_backend", "preannotate", "--project", str(found.id),
                          "--report", str(tmp_path / "report.json")], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    report = json.loads((tmp_path / "report.json").read_text())
    assert run.returncode == 1 and report["done"] == len(SCENES), (report, run.stderr[-2000:])  # 1: the missing one
    [failed] = report["failed"]
    # the SDK's tasks hold resolve paths: read back as the URI, failing as the URI does
    assert failed["task"] == found.tasks[MISSING]["id"] and f"s3://{BUCKET}/images/{MISSING}" in failed["reason"] \
        and "the object may be missing" in failed["reason"], failed
    for name in SCENES:
        predictions = api.predictions(found.tasks[name]["id"])
        assert len(predictions) == 1 and predictions[0]["result"], name


def test_a_storage_host_outside_outbound_allow_is_named(label_studio, s3, backend, label_config):
    """The shared backend has no OUTBOUND_ALLOW: Label Studio's 303 to the bucket's loopback host is refused."""
    api = label_studio.api
    found = s3_project(api, s3, label_config, "fastsam s3 refused", presign=True)
    found.ml, found.names = api.connect_ml(found.id, backend.url), tag_names(label_config)
    answer = click(found, KEYPOINT.file_name)
    errors = " ".join(answer.get("errors") or [])
    assert "403" in errors and "storage host refused: set OUTBOUND_ALLOW" in errors, str(answer)[:600]
