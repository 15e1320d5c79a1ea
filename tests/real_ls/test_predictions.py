"""Data Manager → Retrieve Predictions (``POST /api/dm/actions?id=retrieve_tasks_predictions``).

Label Studio calls ``/setup`` for the model version, skips every task that already has a prediction
of that version, sends the rest to ``/predict`` in one batch and stores one prediction per task
with the ``model_version`` each answer carries.
"""

from __future__ import annotations

import pytest

from fastsam_backend.quality.evaluation import iou

from .cases import BOX, ENCLOSED, KEYPOINT, MAX_NEIGHBOUR_IOU, MIN_IOU, brush_masks
from .harness import Backend

# Pre-annotation keeps the instances CLIP places under one of the tag's labels (LABEL_MODE=clip, no
# DEFAULT_LABEL): these targets are among the ones the fixture CLIP keeps.
SCENES = {c.file_name: c for c in (KEYPOINT, BOX, ENCLOSED)}


def stored(api, tasks: dict[str, dict]) -> dict[str, list[dict]]:
    return {name: api.predictions(task["id"]) for name, task in tasks.items()}


def test_retrieve_predictions_stores_one_prediction_per_task(label_studio, backend, label_config):
    api = label_studio.api
    pid = api.create_project("fastsam retrieve predictions", label_config)
    tasks = api.upload(pid, {name: case.png() for name, case in SCENES.items()})
    ml = api.connect_ml(pid, backend.url)
    api.retrieve_predictions(pid)

    version = backend.health()["model_version"]
    assert api.json("GET", f"/api/ml/{ml['id']}")["model_version"] == version
    for name, predictions in stored(api, tasks).items():
        case = SCENES[name]
        assert len(predictions) == 1, f"{name}: {len(predictions)} predictions"
        prediction = predictions[0]
        assert prediction["model_version"] == version
        masks = brush_masks(prediction["result"])
        assert masks and all(m.shape == case.size for m in masks)
        best = max(masks, key=lambda m: iou(m, case.obj.mask))
        on, off = iou(best, case.obj.mask), iou(best, case.other.mask)
        print(f"{name}: {len(masks)} instances, {case.obj.caption} IoU {on:.3f}, with {case.other.caption} {off:.3f}")
        assert on >= MIN_IOU and off < MAX_NEIGHBOUR_IOU, case.describe()
        for region in prediction["result"]:
            assert region["value"][region["type"]][0] in ("Banana", "Orange"), "a label of the tag"


def retrieve_across_a_restart(label_studio, label_config, tmp_path, title: str, **env: str) -> None:
    """Retrieve, restart the backend, retrieve again: the second run must store nothing."""
    api = label_studio.api
    be = Backend(tmp_path, label_studio, name="restarted-backend", **env).start()
    try:
        pid = api.create_project(title, label_config)
        tasks = api.upload(pid, {name: case.png() for name, case in list(SCENES.items())[:2]})
        ml = api.connect_ml(pid, be.url)

        def record() -> str:
            return api.json("GET", f"/api/ml/{ml['id']}")["model_version"]

        api.retrieve_predictions(pid)
        first = stored(api, tasks)
        assert all(len(p) == 1 for p in first.values()), {n: len(p) for n, p in first.items()}
        versions = [("after the first run: /health", be.health()["model_version"]),
                    ("after the first run: LS's ML record", record())]
        be.restart()
        versions.append(("after the restart: /health", be.health()["model_version"]))
        api.retrieve_predictions(pid)
        second = stored(api, tasks)
        versions.append(("after the second run: LS's ML record", record()))
        seen = "\n".join(f"  {where}: {v}" for where, v in versions)
        stored_versions = sorted({p["model_version"] for ps in second.values() for p in ps})
        assert {n: [p["id"] for p in ps] for n, ps in second.items()} == \
            {n: [p["id"] for p in ps] for n, ps in first.items()}, \
            f"the second run stored new predictions (versions stored: {stored_versions}); model versions:\n{seen}"
    finally:
        be.stop()


def test_a_restart_between_two_retrieves_stores_nothing_new(label_studio, label_config, tmp_path):
    retrieve_across_a_restart(label_studio, label_config, tmp_path, "fastsam restart")


@pytest.mark.parametrize("checkpoint", ["missing", "corrupt"])
def test_a_restart_with_clip_configured_but_unloadable_stores_nothing_new(label_studio, label_config, tmp_path,
                                                                         checkpoint):
    """OPEN_CLIP_PRETRAINED names a file that is not there, or one that is not a checkpoint. Without
    CLIP, pre-annotation labels come from DEFAULT_LABEL (else every task gets an error entry); the
    version names the configured CLIP either way, loaded or not."""
    path = tmp_path / f"{checkpoint}-clip.pt"
    if checkpoint == "corrupt":
        path.write_bytes(b"not a torch checkpoint\n" * 64)
    retrieve_across_a_restart(label_studio, label_config, tmp_path, f"fastsam restart, {checkpoint} CLIP",
                              OPEN_CLIP_PRETRAINED=str(path), DEFAULT_LABEL="Banana")

