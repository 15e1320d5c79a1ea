"""Labels learned from annotations, through a real Label Studio 1.23.2.

Annotations are created, updated and deleted through LS's API; LS sends its annotation webhooks
(to the ``<ML URL>/webhook`` LS adds by itself when the model is connected, and to a relay in
front of our ``/webhook`` that keeps LS's payloads). The payloads
are written to ``tests/real_ls/artifacts/`` (copied into ``tests/fixtures/ls-webhooks/``, which the
unit tests replay). The backend answers creates and updates 202 and learns them in its background
thread (polled on ``/health``). Then the next pre-annotation (Retrieve Predictions) carries the
learned version.
"""

from __future__ import annotations

import json
from pathlib import Path

import requests

from fastsam_backend.quality.labels_learned import LABEL_CONFIG, brush, example_events
from fastsam_backend.quality.scenes import generate_scene

from .harness import Backend, WebhookRelay, image_bytes, wait_until

ARTIFACTS = Path(__file__).parent / "artifacts"
EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")


def test_annotation_webhooks_teach_labels_and_change_the_model_version(label_studio, tmp_path, note):
    backend = Backend(tmp_path, label_studio, name="learning-backend", LEARN_MIN_EXAMPLES="1").start()
    try:
        run(label_studio, backend, note)
    finally:
        backend.stop()


def run(label_studio, backend, note) -> None:
    api = label_studio.api
    pid = api.create_project("fastsam learned labels", LABEL_CONFIG)
    events = example_events(str(pid), 1)[:2]  # two example scenes, a few labelled objects each
    seeds = [e["annotation"]["id"] for e in events]
    files = {f"learn-{s}.png": image_bytes(generate_scene(s).image) for s in seeds}
    files["learn-eval.png"] = image_bytes(generate_scene(seeds[-1] + 1000).image)
    tasks = api.upload(pid, files)
    ml = api.connect_ml(pid, backend.url)
    api.retrieve_predictions(pid)
    before = api.predictions(tasks["learn-eval.png"]["id"])
    relay = WebhookRelay(f"{backend.url}/webhook")
    try:
        api.json("POST", "/api/webhooks/", json={"project": pid, "url": relay.url, "send_payload": True,
                                                 "send_for_all_actions": False, "actions": list(EVENTS)})
        ids = []
        for seed, event in zip(seeds, events):
            result = event["annotation"]["result"]
            ann = api.json("POST", f"/api/tasks/{tasks[f'learn-{seed}.png']['id']}/annotations",
                           json={"result": result})
            ids.append(ann["id"])
        scene = generate_scene(seeds[0])
        first = scene.objects[0]
        api.json("PATCH", f"/api/annotations/{ids[0]}", json={"result": [brush(first.mask, first.shape)]})
        api.request("DELETE", f"/api/annotations/{ids[1]}")

        def seen() -> list | None:
            actions = [p["action"] for p, _, _ in relay.exchanges]
            return relay.exchanges if all(a in actions for a in EVENTS) else None

        exchanges = wait_until(seen, 60, f"LS's {', '.join(EVENTS)} webhooks")
    finally:
        relay.stop()
    ARTIFACTS.mkdir(exist_ok=True)
    for payload, status, answer in exchanges:
        kept = ARTIFACTS / f"ls-1.23.2-webhook-learn-{payload['action']}.json"
        kept.write_text(json.dumps(payload, indent=1) + "\n")
        note(f"{payload['action']}: backend {status} {json.dumps(answer)[:300]} (payload at {kept})")
        if payload["action"] == "ANNOTATIONS_DELETED":  # a deletion is learned in the request
            assert status == 201 and answer["status"] == "ok", (payload["action"], status, answer)
            assert answer["result"]["learned"] is True
        else:  # creates and updates are accepted at once and learned in the background thread
            assert status == 202 and answer["status"] == "accepted", (payload["action"], status, answer)
            assert answer["result"]["background"] == "thread"
    # Connecting the model made LS add <backend>/webhook for every action (ml.models.create_ml_webhook), so
    # each event reached the backend twice: directly, and through the relay. The second delivery of a
    # create or update is a duplicate, learned once; the second deletion finds its examples gone.
    learning = wait_until(lambda: (h := backend.health()["learning"])["pending"] == 0
                          and h["learned"] + h["failed"] >= 3 and h, 120, "the backend's background learning")
    note(f"background learning: {learning}")
    assert learning["learned"] == 3 and learning["duplicate"] >= 3 and not learning["failed"], learning
    # what the project has now: a deletion of no annotation answers its summary
    final = requests.post(f"{backend.url}/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": pid},
                                                          "annotations": []}, timeout=30).json()["result"]
    assert final["examples_per_label"] == {first.shape: 1}, final
    hooks = api.json("GET", "/api/webhooks/", params={"project": pid})
    assert any(h["url"] == f"{backend.url}/webhook" and h["send_for_all_actions"] for h in hooks), hooks
    # The next Retrieve Predictions: a new model version (the learned label), so LS predicts the task again
    api.retrieve_predictions(pid)
    after = api.predictions(tasks["learn-eval.png"]["id"])
    versions = [p["model_version"] for p in before], [p["model_version"] for p in after]
    note(f"eval task's prediction versions before / after learning: {versions}")
    assert len(before) == 1 and "+L" not in before[0]["model_version"]
    assert len(after) == 2 and "+L" in after[-1]["model_version"], versions
    assert api.json("GET", f"/api/ml/{ml['id']}")["model_version"] == after[-1]["model_version"]
