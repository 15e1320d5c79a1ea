"""Label top-1 of pre-annotated instances against the number of annotated examples per label.

Examples are posted as Label Studio's own ``ANNOTATION_CREATED`` webhook bodies (brush RLE of the
ground-truth masks of example scenes) through ``FastSAMService.fit``, the path ``/webhook`` takes;
then held-out scenes are pre-annotated through ``FastSAMService.predict`` (no context) and each
returned region that matches a ground-truth object (IoU ≥ 0.5) is a hit when its label is the
object's shape. ``0`` examples is the zero-shot baseline. Used by ``fastsam-backend quality
--labels`` (docs/learned-labels.md) and the test-suite (the bar).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fastsam_backend.ls.protocol import SetupRequest, predict_request
from fastsam_backend.ls.rle import decode_rle, encode_rle
from fastsam_backend.quality import lsrequests
from fastsam_backend.quality.evaluation import TEST_SEED0, iou
from fastsam_backend.quality.scenes import SHAPES, Scene, generate_scene
from fastsam_backend.service.orchestrator import FastSAMService

EXAMPLE_SEED0 = TEST_SEED0 + 50_000  # scenes the annotators "labelled" (disjoint from the evaluated ones)
EVAL_SEED0 = TEST_SEED0 + 60_000
# Development scenes (``quality-labels --dev``): the label model's settings are chosen on these and
# the example scenes, never on EVAL_SEED0's. Far past the examples ``example_events`` takes.
DEV_SEED0 = EXAMPLE_SEED0 + 5_000
LABEL_CONFIG = ("<View><Image name=\"image\" value=\"$image\"/><BrushLabels name=\"mask\" toName=\"image\">"
                + "".join(f"<Label value=\"{s}\"/>" for s in SHAPES) + "</BrushLabels></View>")


@dataclass(frozen=True)
class LabelTop1:
    examples_per_label: int
    top1: float
    instances: int  # pre-annotated instances matching a ground-truth object
    annotations: int  # webhook events posted


def brush(mask: np.ndarray, label: str) -> dict:
    h, w = mask.shape
    return {"id": f"r{np.count_nonzero(mask)}", "type": "brushlabels", "from_name": "mask", "to_name": "image",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": [label]}}


def annotation_event(project: str, annotation_id: int, task_id: int, scene: Scene, objects: list[int]) -> dict:
    """An ``ANNOTATION_CREATED`` body shaped like Label Studio 1.23.2's (``tests/fixtures/ls-webhooks``)."""
    result = [brush(scene.objects[i].mask, scene.objects[i].shape) for i in objects]
    return {"action": "ANNOTATION_CREATED",
            "annotation": {"id": annotation_id, "task": task_id, "result": result, "was_cancelled": False},
            "task": {"id": task_id, "data": {"image": lsrequests.data_uri(scene.image)}},
            "project": {"id": int(project) if project.isdigit() else project, "label_config": LABEL_CONFIG}}


def example_events(project: str, per_label: int, seed0: int = EXAMPLE_SEED0) -> list[dict]:
    """Annotations of example scenes, in scene order, until every shape has ``per_label`` regions."""
    need = dict.fromkeys(SHAPES, per_label)
    events, seed = [], seed0
    while any(need.values()) and seed < seed0 + 10_000:
        scene = generate_scene(seed)
        chosen = []
        for i, obj in enumerate(scene.objects):
            if need[obj.shape] > 0:
                need[obj.shape] -= 1
                chosen.append(i)
        if chosen:
            events.append(annotation_event(project, seed, seed, scene, chosen))
        seed += 1
    return events


def label_top1(service: FastSAMService, project: str, seeds: Iterable[int]) -> tuple[float, int]:
    """Top-1 label accuracy of the project's pre-annotated instances that match an object."""
    hits = total = 0
    for seed in seeds:
        scene = generate_scene(seed)
        h, w = scene.image.shape[:2]
        task = {"id": seed, "data": {"image": lsrequests.data_uri(scene.image)}}
        prediction = service.predict(predict_request([task], None, LABEL_CONFIG, project))[0]
        for region in prediction["result"]:
            mask = decode_rle(region["value"]["rle"], h, w)
            best = max(scene.objects, key=lambda o: iou(mask, o.mask))
            if iou(mask, best.mask) >= 0.5:
                total += 1
                hits += region["value"]["brushlabels"][0] == best.shape
    return (hits / total if total else float("nan")), total


def examples_table(service: FastSAMService, counts: Iterable[int] = (0, 1, 3, 10, 30), scenes: int = 40,
                   project_prefix: str = "labels-k", eval_seed0: int = EVAL_SEED0) -> list[LabelTop1]:
    """One row per count; each count is its own project. Every instance gets a label
    (``label_min_similarity`` -1: top-1 over all, not over those CLIP is sure of). Scenes from
    ``eval_seed0`` are pre-annotated (``DEV_SEED0``: development figures)."""
    rows = []
    for k in counts:
        project = f"{project_prefix}{k}"
        service.setup(SetupRequest(project, LABEL_CONFIG, extra_params={"label_min_similarity": -1.0}))
        events = example_events(project, k) if k else []
        for body in events:
            service.fit(body["action"], body)
        top1, n = label_top1(service, project, range(eval_seed0, eval_seed0 + scenes))
        rows.append(LabelTop1(k, top1, n, len(events)))
    return rows
