"""Label Studio's annotation webhooks, parsed: which annotation, which task, which labelled regions.

Payloads as Label Studio 1.23.2 sends them (``tests/fixtures/ls-webhooks/``):

- ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``: ``{"action", "annotation": {"id", "task",
  "result": [region, ...], "was_cancelled", ...}, "task": {"id", "data", ...}, "project": {"id",
  "label_config", ...}}``;
- ``ANNOTATIONS_CREATED`` (an import): ``"annotation"`` and ``"task"`` are lists;
- ``ANNOTATIONS_DELETED``: ``{"action", "annotations": [{"id"}, ...], "project": {...}}``.

Regions are in percent of ``original_width`` × ``original_height`` (brush: RLE of the whole image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from fastsam_backend.errors import BadRequest
from fastsam_backend.ls.rle import decode_rle

CREATED, UPDATED, DELETED = "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"
CREATED_MANY = "ANNOTATIONS_CREATED"
ANNOTATION_EVENTS = frozenset({CREATED, UPDATED, DELETED, CREATED_MANY})
REGION_KINDS = ("brushlabels", "polygonlabels", "rectanglelabels")


@dataclass(frozen=True)
class AnnotatedRegion:
    """One labelled region: ``mask`` ``(H, W)`` bool at the image's original size (a rectangle:
    its filled box); ``is_box`` for rectangles, which are matched to instances by box."""

    label: str
    kind: str
    mask: np.ndarray
    is_box: bool


@dataclass(frozen=True)
class Annotation:
    """An annotation that was created or updated; ``cancelled``: skipped, it teaches nothing."""

    id: str
    task_id: str | None
    task_data: dict[str, Any]
    regions: tuple[AnnotatedRegion, ...]
    cancelled: bool


@dataclass(frozen=True)
class AnnotationEvent:
    action: str
    project: str
    label_config: str | None
    annotations: tuple[Annotation, ...] = ()  # created / updated
    deleted: tuple[str, ...] = ()  # ids of deleted annotations


def _project(body: dict[str, Any]) -> tuple[str, str | None]:
    project = body.get("project")
    if isinstance(project, dict) and project.get("id") is not None:
        config = project.get("label_config")
        return str(project["id"]), config if isinstance(config, str) else None
    if isinstance(project, (int, str)) and str(project):
        return str(project).split(".", 1)[0], None
    raise BadRequest("webhook body has no project.id (Label Studio sends the project with annotation events)")


def parse_event(action: str, body: dict[str, Any]) -> AnnotationEvent:
    """Typed event from a webhook body; malformed bodies raise ``BadRequest`` naming the field."""
    project, config = _project(body)
    if action == DELETED:
        items = body.get("annotations")
        if not isinstance(items, list) or not all(isinstance(a, dict) and "id" in a for a in items):
            raise BadRequest("ANNOTATIONS_DELETED needs annotations: [{\"id\": ...}, ...]")
        return AnnotationEvent(action, project, config, deleted=tuple(str(a["id"]) for a in items))
    annotations, tasks = body.get("annotation"), body.get("task")
    if not isinstance(annotations, list):
        annotations, tasks = [annotations], [tasks]
    if not isinstance(tasks, list) or len(tasks) != len(annotations):
        tasks = [None] * len(annotations)
    by_id = {t.get("id"): t for t in tasks if isinstance(t, dict)}
    parsed = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or ann.get("id") is None:
            raise BadRequest(f"{action} needs annotation.id (annotation[{i}])")
        task = tasks[i] if isinstance(tasks[i], dict) else by_id.get(ann.get("task"))
        task = task if isinstance(task, dict) else {}
        task_id = task.get("id", ann.get("task"))
        parsed.append(Annotation(str(ann["id"]), None if task_id is None else str(task_id),
                                 task.get("data") if isinstance(task.get("data"), dict) else {},
                                 parse_regions(ann.get("result") or [], f"annotation {ann['id']}"),
                                 bool(ann.get("was_cancelled"))))
    return AnnotationEvent(action, project, config, annotations=tuple(parsed))


def parse_regions(result: list[Any], where: str) -> tuple[AnnotatedRegion, ...]:
    """The brush, polygon and rectangle regions with a label; other regions are ignored."""
    if not isinstance(result, list):
        raise BadRequest(f"{where}: result must be a list of regions")
    out = []
    for j, region in enumerate(result):
        if not isinstance(region, dict) or region.get("type") not in REGION_KINDS:
            continue
        kind, value = region["type"], region.get("value") or {}
        labels = value.get(kind) if isinstance(value, dict) else None
        try:
            w, h = int(region["original_width"]), int(region["original_height"])
        except (KeyError, TypeError, ValueError):
            raise BadRequest(f"{where}: result[{j}] has no original_width/original_height") from None
        if not labels or not isinstance(labels[0], str) or w <= 0 or h <= 0:
            continue
        try:
            mask = region_mask(kind, value, h, w)
        except (ValueError, TypeError, KeyError) as exc:
            raise BadRequest(f"{where}: result[{j}] ({kind}) is not a valid region: {exc}") from None
        if mask.any():
            out.append(AnnotatedRegion(labels[0], kind, mask, kind == "rectanglelabels"))
    return tuple(out)


def region_mask(kind: str, value: dict[str, Any], h: int, w: int) -> np.ndarray:
    """``(h, w)`` bool mask of a region's ``value`` (percent coordinates; brush RLE of the image)."""
    if kind == "brushlabels":
        if value.get("format", "rle") != "rle":
            raise ValueError(f"brush format {value.get('format')!r}, only 'rle' is read")
        return decode_rle(value["rle"], h, w)
    out = np.zeros((h, w), np.uint8)
    if kind == "polygonlabels":
        pts = np.asarray(value["points"], np.float64).reshape(-1, 2) * [w / 100.0, h / 100.0]
        if len(pts) >= 3:
            cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 1)
        return out.astype(bool)
    x, y = float(value["x"]) * w / 100.0, float(value["y"]) * h / 100.0
    bw, bh = float(value["width"]) * w / 100.0, float(value["height"]) * h / 100.0
    angle = float(value.get("rotation") or 0.0)
    if angle:  # LS rotates about the top-left corner
        t = np.deg2rad(angle)
        corners = np.array([[0, 0], [bw, 0], [bw, bh], [0, bh]])
        rot = corners @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) + [x, y]
        cv2.fillPoly(out, [np.round(rot).astype(np.int32)], 1)
    else:
        x0, y0 = max(0, round(x)), max(0, round(y))
        out[y0:max(y0, round(y + bh)), x0:max(x0, round(x + bw))] = 1
    return out.astype(bool)
