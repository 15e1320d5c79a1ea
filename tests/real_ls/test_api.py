"""Through a real Label Studio's API, as its UI does it: connect, upload, interactive prompts.

Every answer is the JSON Label Studio returns from ``POST /api/ml/<id>/interactive-annotating``
(it forwards the task and the drawn regions to our ``/predict``); its BrushLabels RLE is decoded
with the SDK and compared with the generated scene's ground truth.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

from fastsam_backend.quality.evaluation import iou

from . import cases
from .cases import BOX, ENCLOSED, KEYPOINT, NEGATIVE, TEXT, brush_masks, check_mask
from .harness import WebhookRelay, tag_names, wait_until

SCENES = {c.file_name: c for c in (KEYPOINT, BOX, TEXT, NEGATIVE, ENCLOSED)}


@pytest.fixture(scope="module")
def project(label_studio, backend, label_config):
    """A project with the README's config, the scenes uploaded, our backend connected."""
    api = label_studio.api
    pid = api.create_project("fastsam api tests", label_config)
    tasks = api.upload(pid, {name: case.png() for name, case in SCENES.items()})
    ml = api.connect_ml(pid, backend.url)
    return SimpleNamespace(id=pid, tasks=tasks, ml=ml, api=api, names=tag_names(label_config))


def ask(project, case: cases.Case, regions: list[dict]) -> dict:
    """LS's answer's ``data`` (the prediction LS would show) for prompts on the case's task."""
    answer = project.api.interactive(project.ml["id"], project.tasks[case.file_name]["id"], regions)
    assert "data" in answer, f"LS answered {str(answer)[:600]}"
    return answer["data"]


def only_mask(data: dict) -> np.ndarray:
    masks = brush_masks(data.get("result") or [])
    assert len(masks) == 1, f"expected one brush region, got {len(masks)}: {str(data)[:400]}"
    return masks[0]


def test_connect_validates_the_backend_through_health_and_setup(project, backend):
    ml = project.api.json("GET", f"/api/ml/{project.ml['id']}")
    assert ml["state"] == "CO", f"state {ml['state']} ({ml.get('readable_state')}): {ml.get('error_message')}"
    assert ml["is_interactive"] is True
    # only /setup tells LS a model_version, and LS calls it only after /health answered
    assert ml["model_version"] == backend.health()["model_version"]


def test_images_are_uploads_served_by_label_studio_behind_auth(project, label_studio):
    for name, case in SCENES.items():
        url = project.tasks[name]["data"]["image"]
        assert url.startswith("/data/upload/"), url
        anonymous = requests.get(label_studio.url + url, timeout=30, allow_redirects=False)
        assert anonymous.status_code in (302, 401, 403), f"{url} served without credentials"
        served = project.api.request("GET", url)
        assert served.status_code == 200, f"{url}: HTTP {served.status_code}"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB")), case.scene.image)


def test_keypoint_click_answers_the_mask_of_the_clicked_object(project, backend):
    data = ask(project, KEYPOINT, [cases.keypoint(KEYPOINT, project.names, label="Orange")])
    print(check_mask(only_mask(data), KEYPOINT))
    region = data["result"][0]
    assert region["from_name"] == project.names["brushlabels"] and region["to_name"] == "image"
    assert region["value"]["brushlabels"] == ["Orange"], "the label picked on the keypoint"
    assert data["model_version"] == backend.health()["model_version"]


def test_negative_keypoint_keeps_the_neighbour_out(project):
    positive = cases.keypoint(NEGATIVE, project.names)
    negative = cases.keypoint(NEGATIVE, project.names, which=NEGATIVE.other, positive=False)
    print(check_mask(only_mask(ask(project, NEGATIVE, [positive, negative])), NEGATIVE))
    # an Alt-click alone asks for nothing: it must not come back as the object under it
    alone = brush_masks(ask(project, NEGATIVE, [negative]).get("result") or [])
    assert not any(iou(m, NEGATIVE.other.mask) >= 0.5 for m in alone), "a negative click was taken as positive"


def test_negative_keypoint_cuts_an_enclosed_object_out(project):
    """A small triangle inside a circle: Alt-click on it must keep it out of the circle's mask."""
    positive = cases.keypoint(ENCLOSED, project.names)
    negative = cases.keypoint(ENCLOSED, project.names, which=ENCLOSED.other, positive=False)
    mask = only_mask(ask(project, ENCLOSED, [positive, negative]))
    print(check_mask(mask, ENCLOSED))
    x, y = ENCLOSED.click(ENCLOSED.other)
    covered = np.count_nonzero(mask & ENCLOSED.other.mask) / np.count_nonzero(ENCLOSED.other.mask)
    assert not mask[y, x] and covered < 0.5, f"{covered:.0%} of the Alt-clicked {ENCLOSED.other.caption} kept"


def test_box_answers_the_mask_of_the_boxed_object(project):
    data = ask(project, BOX, [cases.box(BOX, project.names, label="Banana")])
    print(check_mask(only_mask(data), BOX))
    assert data["result"][0]["value"]["brushlabels"] == ["Banana"]


def test_text_prompt_answers_the_object_it_names(project):
    data = ask(project, TEXT, [cases.text(TEXT.obj.caption, project.names)])
    print(TEXT.obj.caption, "->", check_mask(only_mask(data), TEXT))


def test_annotation_webhook_reaches_the_backend(project, backend, note):
    """LS's real ANNOTATION_CREATED webhook (relayed to our /webhook); the payload is kept under
    tests/real_ls/artifacts/ for reference."""
    relay = WebhookRelay(f"{backend.url}/webhook")
    try:
        project.api.json("POST", "/api/webhooks/", json={
            "project": project.id, "url": relay.url, "send_payload": True, "send_for_all_actions": False,
            "actions": ["ANNOTATION_CREATED"]})
        data = ask(project, KEYPOINT, [cases.keypoint(KEYPOINT, project.names)])
        task = project.tasks[KEYPOINT.file_name]["id"]
        project.api.json("POST", f"/api/tasks/{task}/annotations", json={"result": data["result"]})
        payload, status, answer = wait_until(lambda: relay.exchanges, 30, "LS's ANNOTATION_CREATED webhook")[0]
    finally:
        relay.stop()
    kept = Path(__file__).parent / "artifacts" / "ls-1.23.2-webhook-ANNOTATION_CREATED.json"
    kept.parent.mkdir(exist_ok=True)
    kept.write_text(json.dumps(payload, indent=1) + "\n")
    note(f"LS's ANNOTATION_CREATED webhook payload kept at {kept}")
    assert payload["action"] == "ANNOTATION_CREATED" and payload["annotation"]["task"] == task
    assert payload["project"]["id"] == project.id
    # accepted and learned in the background (jobs/learn.py); LS's own ML webhook may have come first
    assert status == 202 and answer["status"] == "accepted", (status, answer)
    assert answer["result"]["annotations"] == [str(payload["annotation"]["id"])], answer


def test_a_refused_token_is_shown_when_the_model_is_connected(label_studio, label_config, tmp_path):
    """LS 1.23 disables legacy tokens for new organisations. Before, the model showed "Connected" and
    every click returned nothing (LS swallows the backend's 4xx in the labeling UI). Now /setup asks
    LS whether it accepts the token, and "Validate and Save" (POST /api/ml) shows the fix."""
    from .harness import Backend

    legacy = "0123456789abcdef0123456789abcdef01234567"  # a legacy-style key this LS does not accept
    be = Backend(tmp_path, label_studio, name="refused-token-backend", LABEL_STUDIO_API_KEY=legacy).start()
    try:
        api = label_studio.api
        pid = api.create_project("fastsam refused token", label_config)
        answer = api.request("POST", "/api/ml", json={"url": be.url, "project": pid, "is_interactive": True,
                                                     "title": "fastsam"})
        print(f"Label Studio answered Validate and Save with HTTP {answer.status_code}: {answer.text[:400]}")
        assert answer.status_code >= 400, answer.text[:400]
        # LS shows only the status line of /setup's answer ("Reason: 422 Client Error: <reason> for url")
        assert "Personal Access Token" in answer.text and "Legacy Tokens" in answer.text
        assert legacy not in answer.text and legacy not in (tmp_path / "refused-token-backend.log").read_text()
    finally:
        be.stop()
