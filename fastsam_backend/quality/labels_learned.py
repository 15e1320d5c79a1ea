"""Label top-1 of pre-annotated instances against the number of annotated examples per label.

Examples are posted as Label Studio's own ``ANNOTATION_CREATED`` webhook bodies (brush RLE of the
ground-truth masks of example scenes) through ``FastSAMService.fit``, the path ``/webhook`` takes;
then held-out scenes are pre-annotated through ``FastSAMService.predict`` (no context) and each
returned region that matches a ground-truth object (IoU ≥ 0.5) is a hit when its label is the
object's shape. ``0`` examples is the zero-shot baseline. Used by ``fastsam-backend quality-labels``
(docs/learned-labels.md's tables) and the test-suite (the bars).

Two curves: ``examples_table`` by examples per label (the first objects of each shape in scene
order), and ``tasks_table`` as a project meets it: by annotated *tasks*, every object of a task
labelled, on scenes whose shapes are drawn with uneven frequencies (``UNEVEN_SHAPES``), with the
project's default options and ``LEARN_MIN_EXAMPLES``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
# The by-tasks curve: its own scenes, shapes drawn 6:5:4:3:2:2:1:1 (uneven, as real label frequencies
# are). Annotated tasks and pre-annotated scenes, development and held-out: four disjoint ranges.
UNEVEN_SHAPES: tuple[str, ...] = sum(((s,) * w for s, w in zip(SHAPES, (6, 5, 4, 3, 2, 2, 1, 1))), ())
TASKS_DEV_SEED0 = TEST_SEED0 + 70_000  # tasks annotated for the development curve
TASKS_DEV_EVAL_SEED0 = TEST_SEED0 + 71_000  # scenes it pre-annotates
TASKS_SEED0 = TEST_SEED0 + 72_000  # tasks annotated for the held-out curve
TASKS_EVAL_SEED0 = TEST_SEED0 + 73_000  # the held-out scenes
LABEL_CONFIG = ("<View><Image name=\"image\" value=\"$image\"/><BrushLabels name=\"mask\" toName=\"image\">"
                + "".join(f"<Label value=\"{s}\"/>" for s in SHAPES) + "</BrushLabels></View>")


@dataclass(frozen=True)
class LabelTop1:
    examples_per_label: int
    top1: float
    instances: int  # pre-annotated instances matching a ground-truth object
    annotations: int  # webhook events posted
    regions: int = 0  # pre-annotated regions (matching an object or not)


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


def uneven_scene(seed: int) -> Scene:
    return generate_scene(seed, shapes=UNEVEN_SHAPES)


def label_top1(service: FastSAMService, project: str, seeds: Iterable[int],
               scene_of: Callable[[int], Scene] = generate_scene) -> tuple[float, int]:
    """Top-1 label accuracy of the project's pre-annotated instances that match an object."""
    top1, matched, _ = label_counts(service, project, seeds, scene_of)
    return top1, matched


def label_counts(service: FastSAMService, project: str, seeds: Iterable[int],
                 scene_of: Callable[[int], Scene] = generate_scene) -> tuple[float, int, int]:
    """``(top-1, instances matching an object, regions)`` of the project's pre-annotations."""
    hits = total = regions = 0
    for seed in seeds:
        scene = scene_of(seed)
        h, w = scene.image.shape[:2]
        task = {"id": seed, "data": {"image": lsrequests.data_uri(scene.image)}}
        prediction = service.predict(predict_request([task], None, LABEL_CONFIG, project))[0]
        for region in prediction["result"]:
            regions += 1
            mask = decode_rle(region["value"]["rle"], h, w)
            best = max(scene.objects, key=lambda o: iou(mask, o.mask))
            if iou(mask, best.mask) >= 0.5:
                total += 1
                hits += region["value"]["brushlabels"][0] == best.shape
    return (hits / total if total else float("nan")), total, regions


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


@dataclass(frozen=True)
class TasksRow:
    tasks: int  # annotated tasks (0: zero-shot)
    top1: float
    instances: int  # pre-annotated instances matching a ground-truth object
    regions: int  # pre-annotated regions
    examples: int  # labelled objects in the annotated tasks
    decides: str  # who labelled the tag: "zero-shot" or "learned"
    why: str  # the decision's leave-one-out figures


def tasks_table(service: FastSAMService, counts: Iterable[int] = (0, 1, 3, 5, 10, 30), scenes: int = 40,
                project_prefix: str = "labels-t", dev: bool = False) -> list[TasksRow]:
    """One row per number of annotated tasks, each its own project with default options: the first
    ``k`` task scenes, every object labelled, posted as ``ANNOTATION_CREATED`` webhook bodies, then
    ``scenes`` other scenes pre-annotated (``dev``: the development ranges)."""
    from fastsam_backend.ls.labelconfig import parse_label_config

    task0, eval0 = (TASKS_DEV_SEED0, TASKS_DEV_EVAL_SEED0) if dev else (TASKS_SEED0, TASKS_EVAL_SEED0)
    (tag,) = parse_label_config(LABEL_CONFIG).pre_annotation_targets()
    rows = []
    for k in counts:
        project = f"{project_prefix}{k}{'d' if dev else ''}"
        service.setup(SetupRequest(project, LABEL_CONFIG))
        examples = 0
        for seed in range(task0, task0 + k):
            scene = uneven_scene(seed)
            examples += len(scene.objects)
            body = annotation_event(project, seed, seed, scene, list(range(len(scene.objects))))
            service.fit(body["action"], body)
        top1, n, regions = label_counts(service, project, range(eval0, eval0 + scenes), uneven_scene)
        model = service.learner.model_for(project)
        if model is None or not model.learned(tag.labels):
            decides, why = "zero-shot", "no label learned" if k else "no annotation"
        else:
            decision = service.learner.decision(model, tag)
            decides, why = decision.as_dict()["decides"], decision.reason
        rows.append(TasksRow(k, top1, n, regions, examples, decides, why))
    return rows
