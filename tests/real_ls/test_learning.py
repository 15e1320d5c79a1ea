"""Labels learned from annotations, through a real Label Studio 1.23.2.

Annotations are created, updated and deleted through LS's API; LS sends its annotation webhooks
(to the ``<ML URL>/webhook`` LS adds by itself when the model is connected, and to a relay in
front of our ``/webhook`` that keeps LS's payloads). The payloads
are written to ``tests/real_ls/artifacts/`` (copied into ``tests/fixtures/ls-webhooks/``, which the
unit tests replay). The backend answers creates and updates 202 and learns them in its background
thread (polled on ``/health``). Then the next pre-annotation (Retrieve Predictions) carries the
learned version. Issue 24: three tasks annotated through LS's API (every object labelled) never make
the next pre-annotation's labels worse than zero-shot's before, nor drop an instance.
"""

from __future__ import annotations

import json
from pathlib import Path

import requests

from fastsam_backend.quality.evaluation import iou
from fastsam_backend.quality.labels_learned import (
    LABEL_CONFIG,
    TASKS_EVAL_SEED0,
    TASKS_SEED0,
    brush,
    example_events,
    uneven_scene,
)
from fastsam_backend.quality.scenes import generate_scene

from .harness import Backend, WebhookRelay, decode_brush, image_bytes, wait_until

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


EVAL_SCENES = 4


def test_three_annotated_tasks_never_make_predictions_worse(label_studio, tmp_path, note):
    """Default settings (LEARN_MIN_EXAMPLES=3): three tasks annotated through LS's API, every object
    labelled; LS's own webhook (added on Connect Model) teaches the backend; the next Retrieve
    Predictions labels held-out tasks at least as well as zero-shot did before, with the same regions."""
    backend = Backend(tmp_path, label_studio, name="learning-3-backend").start()
    try:
        three_tasks(label_studio, backend, note)
    finally:
        backend.stop()


def _top1(api, task_id: int, seed: int) -> tuple[float, int, str]:
    """``(top-1 of regions matching an object, regions, model_version)`` of the task's latest prediction."""
    latest = api.predictions(task_id)[-1]
    scene, hits, matched = uneven_scene(seed), 0, 0
    for region in latest["result"]:
        mask = decode_brush(region)
        best = max(scene.objects, key=lambda o: iou(mask, o.mask))
        if iou(mask, best.mask) >= 0.5:
            matched += 1
            hits += region["value"]["brushlabels"][0] == best.shape
    return hits / max(matched, 1), len(latest["result"]), latest["model_version"]


def three_tasks(label_studio, backend, note) -> None:
    api = label_studio.api
    pid = api.create_project("fastsam learning never hurts", LABEL_CONFIG)
    train = list(range(TASKS_SEED0, TASKS_SEED0 + 3))
    evals = list(range(TASKS_EVAL_SEED0, TASKS_EVAL_SEED0 + EVAL_SCENES))
    tasks = api.upload(pid, {f"t-{s}.png": image_bytes(uneven_scene(s).image) for s in train + evals})
    api.connect_ml(pid, backend.url)
    api.retrieve_predictions(pid)
    before = [_top1(api, tasks[f"t-{s}.png"]["id"], s) for s in evals]
    for s in train:  # the annotator labels every object of the task and submits
        result = [brush(o.mask, o.shape) for o in uneven_scene(s).objects]
        api.json("POST", f"/api/tasks/{tasks[f't-{s}.png']['id']}/annotations", json={"result": result})
    learning = wait_until(lambda: (h := backend.health()["learning"])["pending"] == 0
                          and h["learned"] + h["failed"] >= 3 and h, 180, "the backend's background learning")
    assert learning["learned"] == 3 and not learning["failed"], learning
    project = learning["projects"][str(pid)]
    note(f"after 3 tasks: {project}")
    assert project["learned_labels"], project  # some label has LEARN_MIN_EXAMPLES examples now
    (decision,) = project["tags"].values()
    assert decision["decides"] in ("learned", "zero-shot") and "leave-one-out" in decision["reason"]
    api.retrieve_predictions(pid)
    after = [_top1(api, tasks[f"t-{s}.png"]["id"], s) for s in evals]
    note(f"held-out tasks (top-1, regions, version) before: {before}; after 3 annotated tasks: {after}")
    assert all("+L" in v for _, _, v in after) and not any("+L" in v for _, _, v in before)  # predicted anew
    mean = [sum(t for t, _, _ in rows) / len(rows) for rows in (before, after)]
    assert mean[1] >= mean[0] - 0.02, mean
    assert [n for _, n, _ in after] == [n for _, n, _ in before]  # no instance dropped (nor added)
