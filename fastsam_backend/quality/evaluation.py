"""Mask quality on held-out generated scenes, measured through the backend's own request path.

Every prompt goes in as the LS JSON a user's click would produce, through
``FastSAMService.predict`` (prompt parsing → cached masks → selection → RLE), and the
returned RLE is decoded and compared with the scene's ground truth. Used by the
test-suite (floors) and by ``fastsam-backend quality`` (docs/quality.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np

from fastsam_backend.core.geometry import click_points
from fastsam_backend.ls.protocol import SetupRequest, predict_request
from fastsam_backend.ls.rle import decode_rle
from fastsam_backend.quality import lsrequests
from fastsam_backend.quality.scenes import Scene, generate_scene
from fastsam_backend.service.orchestrator import FastSAMService
from fastsam_backend.settings import PointRule

TEST_SEED0 = 1_000_000  # held-out scenes (training used < 1_000_000)
# Everything mode is asked under this project, set to label every instance with the tag's first
# label: it measures segmentation recall, and CLIP's zero-shot labelling (which drops instances it
# cannot place, unless DEFAULT_LABEL) would otherwise decide which instances come back.
EVERYTHING_PROJECT = "quality-everything"
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="object"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="object"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="object"/></RectangleLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""


@dataclass
class QualityReport:
    """Per-prompt-kind IoU lists and everything-mode recall."""

    point: list[float] = field(default_factory=list)
    box: list[float] = field(default_factory=list)
    separate: list[float] = field(default_factory=list)
    everything_hits: list[bool] = field(default_factory=list)
    text_hits: list[bool] = field(default_factory=list)
    text_unsegmented: int = 0
    scenes: int = 0

    def summary(self) -> dict[str, float]:
        def mean(xs: list) -> float:
            return float(np.mean(xs)) if xs else float("nan")

        return {
            "scenes": self.scenes,
            "point_miou": mean(self.point),
            "point_n": len(self.point),
            "box_miou": mean(self.box),
            "box_n": len(self.box),
            "pos_neg_miou": mean(self.separate),
            "pos_neg_n": len(self.separate),
            "everything_recall50": mean(self.everything_hits),
            "everything_n": len(self.everything_hits),
            "text_top1": mean(self.text_hits),
            "text_n": len(self.text_hits),
            "text_unsegmented": self.text_unsegmented,
        }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def _keypoint(x: int, y: int, w: int, h: int, positive: bool) -> dict:
    return lsrequests.keypoint(x, y, w, h, positive=positive, label="object", from_name="kp")


def _box(mask: np.ndarray) -> dict:
    return lsrequests.box_of(mask, label="object", from_name="box")


def text_region(phrase: str) -> dict:
    """A TextArea prompt as LS sends it in ``context.result`` (``from_name`` of ``LABEL_CONFIG``)."""
    return lsrequests.text(phrase, "prompt")


class SceneClient:
    """Asks the service about one scene as Label Studio would, and decodes the answers."""

    def __init__(self, service: FastSAMService, scene: Scene, project: str | None = None) -> None:
        self.service, self.scene, self.project = service, scene, project
        self.task = {"id": 1, "data": {"image": lsrequests.data_uri(scene.image)}}
        self.h, self.w = scene.image.shape[:2]

    def ask(self, regions: list[dict]) -> np.ndarray:
        """The union of the returned brush regions as an ``(H, W)`` bool mask."""
        request = predict_request([self.task], {"result": regions}, LABEL_CONFIG, self.project)
        prediction = self.service.predict(request)[0]
        out = np.zeros((self.h, self.w), bool)
        for region in prediction["result"]:
            out |= decode_rle(region["value"]["rle"], self.h, self.w)
        return out

    def click(self, x: int, y: int, positive: bool = True) -> dict:
        return _keypoint(x, y, self.w, self.h, positive)

    def segmented(self, mask: np.ndarray) -> bool:
        """Whether one of the cached instance masks finds ``mask`` (IoU ≥ 0.5)."""
        masks = self.service.masks_for(self.task["data"]["image"]).masks
        return any(iou(masks.mask(i), mask) >= 0.5 for i in range(len(masks)))

    def everything(self) -> list[np.ndarray]:
        prediction = self.service.predict(predict_request([self.task], None, LABEL_CONFIG, EVERYTHING_PROJECT))[0]
        return [decode_rle(r["value"]["rle"], self.h, self.w) for r in prediction["result"]
                if r["type"] == "brushlabels"]


def overlapping_pairs(scene: Scene) -> list[tuple[int, int]]:
    """(a, b) index pairs of objects that touch or overlap (b's dilated mask meets a)."""
    pairs = []
    kernel = np.ones((5, 5), np.uint8)
    for b, obj_b in enumerate(scene.objects):
        grown = cv2.dilate(obj_b.mask.astype(np.uint8), kernel).astype(bool)
        for a, obj_a in enumerate(scene.objects):
            if a != b and (grown & obj_a.mask).any():
                pairs.append((a, b))
    return pairs


def evaluate(service: FastSAMService, seeds: Iterable[int], *, project: str | None = None,
             clicks_per_object: int = 2, everything: bool = True, text: bool = False,
             geometry: bool = True) -> QualityReport:
    """Run the point, box, positive+negative and everything-mode checks on the given scenes.

    ``text`` adds the text check (needs CLIP): the caption ("red circle") of each object whose
    caption names no other object in its scene; a hit when the answer has IoU ≥ 0.5 with it.
    Objects FastSAM did not segment are counted apart (``text_unsegmented``): CLIP can only
    choose among the cached masks, and segmentation recall is the everything check's.
    ``geometry=False`` runs the text check alone.
    """
    report = QualityReport()
    if everything:
        service.setup(SetupRequest(EVERYTHING_PROJECT, extra_params={"label_mode": "first"}))
    for seed in seeds:
        scene = generate_scene(seed)
        client = SceneClient(service, scene, project)
        rng = np.random.default_rng(seed)
        report.scenes += 1
        if text:
            _text_check(client, scene, report)
        if not geometry:
            continue
        for obj in scene.objects:
            for x, y in click_points(obj.mask, rng, clicks_per_object - 1):
                report.point.append(iou(client.ask([client.click(x, y)]), obj.mask))
            report.box.append(iou(client.ask([_box(obj.mask)]), obj.mask))
        for a, b in overlapping_pairs(scene):
            (xa, ya), (xb, yb) = click_points(scene.objects[a].mask, rng, 0)[0], \
                click_points(scene.objects[b].mask, rng, 0)[0]
            got = client.ask([client.click(xa, ya), client.click(xb, yb, positive=False)])
            report.separate.append(iou(got, scene.objects[a].mask))
        if everything:
            found = client.everything()
            for obj in scene.objects:
                report.everything_hits.append(any(iou(m, obj.mask) >= 0.5 for m in found))
    return report


def _text_check(client: SceneClient, scene: Scene, report: QualityReport) -> None:
    captions = Counter(obj.caption for obj in scene.objects)
    for obj in scene.objects:
        if captions[obj.caption] != 1:
            continue
        if not client.segmented(obj.mask):
            report.text_unsegmented += 1
            continue
        report.text_hits.append(iou(client.ask([text_region(obj.caption)]), obj.mask) >= 0.5)


def compare_point_rules(service: FastSAMService, seeds: list[int]) -> dict[str, dict[str, float]]:
    """The same scenes under each ``PointRule`` (set per project through /setup's extra_params)."""
    table = {}
    for rule in PointRule:
        project = f"rule-{rule.value}"
        service.setup(SetupRequest(project, extra_params={"point_rule": rule.value}))
        report = evaluate(service, seeds, project=project, everything=False)
        table[rule.value] = report.summary()
    return table


def held_out_seeds(n: int, offset: int = 0) -> list[int]:
    return [TEST_SEED0 + offset + i for i in range(n)]
