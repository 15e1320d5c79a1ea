"""Every box rule and point rule, per case type, on the ordinary and the hard suite (issue #15),
and polygon answers against the brush answer of the same selection.

Through the backend's request path like ``evaluation``: each rule is a project whose
``extra_params`` set it, each prompt the LS JSON of a click or a box (the object's exact box),
each answer decoded and compared with the ground truth. Case types come from
``hardscenes.HardScene.cases``; ordinary scenes' objects are all ``other``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from fastsam_backend.core.geometry import click_points
from fastsam_backend.ls.polygons import outlines_mask
from fastsam_backend.ls.protocol import SetupRequest, predict_request
from fastsam_backend.ls.rle import decode_rle
from fastsam_backend.quality import lsrequests
from fastsam_backend.quality.evaluation import LABEL_CONFIG, iou, overlapping_pairs
from fastsam_backend.quality.hardscenes import CASES, FILLER
from fastsam_backend.quality.scenes import Scene
from fastsam_backend.service.orchestrator import FastSAMService
from fastsam_backend.settings import BoxRule, PointRule

# The evaluation's config plus a PolygonLabels tag: the "both" project answers in brush and polygon.
POLYGON_CONFIG = LABEL_CONFIG.replace(
    "</View>", '  <PolygonLabels name="poly" toName="image"><Label value="object"/></PolygonLabels>\n</View>')
COLUMNS = (*CASES, FILLER, "all")
# Beside the box rules: the best IoU any of the image's masks has with the object, what no rule
# that picks one mask can beat (the fixture's segmentation recall bounds it).
CEILING = "best mask (ceiling)"


@dataclass
class Comparison:
    """IoU lists: ``[metric][rule][case]``; metric ``box``, ``click``, ``pos_neg``; and polygon vs
    brush IoUs (box and click answers of the default rules) per case."""

    ious: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    polygon: dict = field(default_factory=lambda: defaultdict(list))
    scenes: int = 0

    def add(self, metric: str, rule: str, case: str, value: float) -> None:
        self.ious[metric][rule][case].append(value)
        self.ious[metric][rule]["all"].append(value)

    def table(self, metric: str) -> dict[str, dict[str, tuple[float, int]]]:
        """``{rule: {case: (mean, n)}}``."""
        return {rule: {case: (float(np.mean(v)), len(v)) for case, v in cases.items()}
                for rule, cases in self.ious[metric].items()}

    def polygon_summary(self) -> dict[str, float]:
        every = [v for vs in self.polygon.values() for v in vs]
        hollow = self.polygon.get("hollow", [])
        return {"mean": float(np.mean(every)) if every else float("nan"),
                "p5": float(np.percentile(every, 5)) if every else float("nan"), "n": len(every),
                "hollow_mean": float(np.mean(hollow)) if hollow else float("nan"), "hollow_n": len(hollow)}

    def as_json(self) -> dict:
        return {"scenes": self.scenes, **{m: self.table(m) for m in ("box", "click", "pos_neg")},
                "polygon_vs_brush": self.polygon_summary()}


class _Asker:
    def __init__(self, service: FastSAMService, scene: Scene) -> None:
        self.service, self.scene = service, scene
        self.task = {"id": 1, "data": {"image": lsrequests.data_uri(scene.image)}}
        self.h, self.w = scene.image.shape[:2]

    def regions(self, regions: list[dict], project: str) -> list[dict]:
        request = predict_request([self.task], {"result": regions}, POLYGON_CONFIG, project)
        return self.service.predict(request)[0]["result"]

    def brush(self, regions: list[dict], project: str) -> np.ndarray:
        out = np.zeros((self.h, self.w), bool)
        for r in self.regions(regions, project):
            if r["type"] == "brushlabels":
                out |= decode_rle(r["value"]["rle"], self.h, self.w)
        return out

    def both(self, regions: list[dict], project: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The brush mask and the filled polygons of one answer (None: no answer)."""
        answer = self.regions(regions, project)
        brush = np.zeros((self.h, self.w), bool)
        outlines = []
        for r in answer:
            if r["type"] == "brushlabels":
                brush |= decode_rle(r["value"]["rle"], self.h, self.w)
            elif r["type"] == "polygonlabels":
                outlines.append(np.asarray(r["value"]["points"], np.float64) * [self.w / 100, self.h / 100])
        return (brush, outlines_mask(outlines, (self.h, self.w))) if brush.any() else None

    def click(self, x: int, y: int, positive: bool = True) -> dict:
        return lsrequests.keypoint(x, y, self.w, self.h, positive=positive, label="object", from_name="kp")

    def box(self, mask: np.ndarray) -> dict:
        return lsrequests.box_of(mask, label="object", from_name="box")


def compare_rules(service: FastSAMService, seeds: Iterable[int], scene_of: Callable[[int], Scene], *,
                  clicks_per_object: int = 2, polygons: bool = True) -> Comparison:
    """Box IoU under every ``BoxRule``, click and positive+negative IoU under every ``PointRule``,
    per case type; with ``polygons``, the polygon vs brush IoU of the default rules' answers."""
    for rule in BoxRule:
        service.setup(SetupRequest(f"box-{rule.value}", extra_params={"box_rule": rule.value}))
    for rule in PointRule:
        service.setup(SetupRequest(f"point-{rule.value}", extra_params={"point_rule": rule.value}))
    service.setup(SetupRequest("both", extra_params={"interactive_output": "both"}))
    out = Comparison()
    for seed in seeds:
        scene = scene_of(seed)
        out.scenes += 1
        ask = _Asker(service, scene)
        cases = getattr(scene, "cases", ()) or (FILLER,) * len(scene.objects)
        rng = np.random.default_rng(seed)
        cached = service.masks_for(ask.task["data"]["image"]).masks
        for obj, case in zip(scene.objects, cases):
            box = ask.box(obj.mask)
            out.add("box", CEILING, case, max((iou(cached.mask(i), obj.mask) for i in range(len(cached))),
                                              default=0.0))
            for rule in BoxRule:
                out.add("box", rule.value, case, iou(ask.brush([box], f"box-{rule.value}"), obj.mask))
            points = click_points(obj.mask, rng, clicks_per_object - 1)
            for rule in PointRule:
                for x, y in points:
                    out.add("click", rule.value, case, iou(ask.brush([ask.click(x, y)], f"point-{rule.value}"),
                                                          obj.mask))
            if polygons:
                for prompt in (box, ask.click(*points[0])):
                    if (pair := ask.both([prompt], "both")) is not None:
                        out.polygon[case].append(iou(pair[1], pair[0]))
        for a, b in overlapping_pairs(scene):
            (xa, ya), (xb, yb) = (click_points(scene.objects[i].mask, rng, 0)[0] for i in (a, b))
            prompt = [ask.click(xa, ya), ask.click(xb, yb, positive=False)]
            for rule in PointRule:
                out.add("pos_neg", rule.value, cases[a], iou(ask.brush(prompt, f"point-{rule.value}"),
                                                            scene.objects[a].mask))
    return out


def markdown(comparison: Comparison, title: str) -> str:
    """The tables of docs/quality.md: one row per rule, one column per case type."""
    lines = []
    for metric, name in (("box", "box rule: box IoU"), ("click", "point rule: click IoU"),
                         ("pos_neg", "point rule: pos+neg IoU")):
        table = comparison.table(metric)
        cols = [c for c in COLUMNS if any(c in row for row in table.values())]
        lines.append(f"\n{title} — {name}\n")
        lines.append("| rule | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        rows = sorted(table.items(), key=lambda kv: kv[0] == CEILING)  # the ceiling last
        for rule, row in rows:
            name_cell = rule if rule == CEILING else f"`{rule}`"
            lines.append(f"| {name_cell} | " + " | ".join(f"{row[c][0]:.3f}" if c in row else "–" for c in cols) + " |")
        lines.append("| n | " + " | ".join(str(rows[0][1][c][1]) for c in cols) + " |")
    poly = comparison.polygon_summary()
    if poly["n"]:
        lines.append(f"\npolygon vs brush answer of the same selection: mean IoU {poly['mean']:.3f}, "
                     f"5th percentile {poly['p5']:.3f} (n {poly['n']}); hollow objects {poly['hollow_mean']:.3f} "
                     f"(n {poly['hollow_n']})")
    return "\n".join(lines)
