"""Exemplar prompts measured (issue #26): precision, recall and F1 of the answered regions on
``exemplar_scenes``, through the backend's own request path (LS JSON → ``FastSAMService.predict``
→ RLE regions, decoded here), with the text prompt "all <colour> <shape>" beside it.

An answered region is a true positive when it matches a target object not matched yet (IoU ≥ 0.5,
greedy, best IoU first); the objects marked as exemplars count like every other target. A false
positive is attributed to the distractor type it overlaps (IoU ≥ 0.5), else to ``none`` (a
background or part mask).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from fastsam_backend.core.geometry import click_points
from fastsam_backend.ls.protocol import SetupRequest, predict_request
from fastsam_backend.ls.rle import decode_rle
from fastsam_backend.quality import lsrequests
from fastsam_backend.quality.evaluation import iou
from fastsam_backend.quality.exemplar_scenes import DISTRACTOR_TYPES, KindScene, generate_kind_scene
from fastsam_backend.service.orchestrator import FastSAMService

PROJECT = "quality-exemplars"
EXEMPLAR_TAGS = ("similar", "similar_click")
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="object"/></BrushLabels>
  <RectangleLabels name="similar" toName="image" smart="true"><Label value="object"/></RectangleLabels>
  <KeyPointLabels name="similar_click" toName="image" smart="true"><Label value="object"/></KeyPointLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""
MODES = ("one box", "one click", "two boxes", "text")


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    fp_by_type: Counter = field(default_factory=Counter)
    f1s: list[float] = field(default_factory=list)  # per scene

    def add(self, tp: int, fp: int, fn: int, fp_types: Counter) -> None:
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        self.fp_by_type.update(fp_types)
        self.f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)

    def summary(self, distractors: Counter) -> dict[str, float]:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0
        out = {"precision": precision, "recall": recall, "mean_f1": float(np.mean(self.f1s)) if self.f1s else 0.0,
               "scenes": len(self.f1s)}
        for kind in DISTRACTOR_TYPES:  # the share of that type's distractors answered (lower is better)
            out[f"fp_{kind}"] = self.fp_by_type[kind] / distractors[kind] if distractors[kind] else 0.0
        return out


def score(scene: KindScene, answered: list[np.ndarray]) -> tuple[int, int, int, Counter]:
    """``(tp, fp, fn, false positives by distractor type)`` of the answered masks."""
    targets = scene.targets
    pairs = sorted(((iou(a, t.mask), i, j) for i, a in enumerate(answered) for j, t in enumerate(targets)),
                   reverse=True)
    used_a, used_t = set(), set()
    for value, i, j in pairs:
        if value < 0.5:
            break
        if i not in used_a and j not in used_t:
            used_a.add(i)
            used_t.add(j)
    fp_types: Counter = Counter()
    for i, a in enumerate(answered):
        if i in used_a:
            continue
        hit = next((o.role for o in scene.objects if o.role != "target" and iou(a, o.mask) >= 0.5), "none")
        fp_types[hit] += 1
    return len(used_a), len(answered) - len(used_a), len(targets) - len(used_t), fp_types


class KindClient:
    """Asks the service about one scene as Label Studio would; answers are lists of region masks."""

    def __init__(self, service: FastSAMService, scene: KindScene) -> None:
        self.service, self.scene = service, scene
        self.task = {"id": 1, "data": {"image": lsrequests.data_uri(scene.image)}}
        self.h, self.w = scene.image.shape[:2]

    def ask(self, regions: list[dict]) -> list[np.ndarray]:
        request = predict_request([self.task], {"result": regions}, LABEL_CONFIG, PROJECT)
        prediction = self.service.predict(request)[0]
        return [decode_rle(r["value"]["rle"], self.h, self.w) for r in prediction["result"]]

    def box(self, mask: np.ndarray) -> dict:
        return lsrequests.box_of(mask, label="object", from_name="similar")

    def click(self, mask: np.ndarray, positive: bool = True) -> dict:
        (x, y), = click_points(mask, np.random.default_rng(0), 0)
        return lsrequests.keypoint(x, y, self.w, self.h, positive=positive, label="object", from_name="similar_click")


def prompts_for(client: KindClient, mode: str) -> list[dict]:
    targets = client.scene.targets
    if mode == "one box":
        return [client.box(targets[0].mask)]
    if mode == "one click":
        return [client.click(targets[0].mask)]
    if mode == "two boxes":
        return [client.box(targets[0].mask), client.box(targets[1].mask)]
    return [lsrequests.text(f"all {client.scene.colour} {client.scene.shape}s", "prompt")]


def setup(service: FastSAMService, **extra: object) -> None:
    service.setup(SetupRequest(PROJECT, LABEL_CONFIG, extra_params={"exemplar_tags": list(EXEMPLAR_TAGS), **extra}))


def evaluate_exemplars(service: FastSAMService, seeds: Iterable[int], modes: tuple[str, ...] = MODES,
                       progress: Callable[[int], None] | None = None) -> dict[str, dict[str, float]]:
    """Per mode, the summary of ``Counts`` over the scenes of ``seeds`` ("text" needs CLIP)."""
    setup(service)
    counts = {mode: Counts() for mode in modes}
    distractors: Counter = Counter()
    for n, seed in enumerate(seeds):
        scene = generate_kind_scene(seed)
        distractors.update(o.role for o in scene.objects if o.role != "target")
        client = KindClient(service, scene)
        for mode in modes:
            counts[mode].add(*score(scene, client.ask(prompts_for(client, mode))))
        if progress is not None:
            progress(n + 1)
    return {mode: c.summary(distractors) for mode, c in counts.items()}


def markdown(table: dict[str, dict[str, float]]) -> str:
    head = ("| prompt | precision | recall | mean F1 | same shape, other colour answered | "
            "same colour, other shape answered | other answered | scenes |\n|---|---|---|---|---|---|---|---|")
    names = {"one box": "one exemplar box", "one click": "one exemplar click", "two boxes": "two exemplar boxes",
             "text": 'text "all <colour> <shape>s"'}
    rows = [f"| {names[m]} | {r['precision']:.3f} | {r['recall']:.3f} | {r['mean_f1']:.3f} | "
            f"{r['fp_same_shape']:.3f} | {r['fp_same_colour']:.3f} | {r['fp_other']:.3f} | {r['scenes']} |"
            for m, r in table.items()]
    return "\n".join([head, *rows])


def calibrate(service: FastSAMService, seeds: Iterable[int]) -> dict[str, np.ndarray | float]:
    """The within-kind spreads of ``core.exemplars`` (``GEOMETRY_SCALES``, ``COLOUR_SCALES``,
    ``CLIP_SCALE``), measured on the instances that match a ground-truth object (IoU ≥ 0.5) of
    ``seeds`` (development seeds only): per feature, the root mean square difference between
    two objects of one kind (same shape and colour) in one image."""
    from fastsam_backend.service.exemplars import cues_for

    geometry, colour, clip = [], [], []
    for seed in seeds:
        scene = generate_kind_scene(seed)
        found = service.masks_for(KindClient(service, scene).task["data"]["image"])
        cues = cues_for(service, found)
        masks = found.masks
        matched: dict[tuple[str, str], list[int]] = {}
        for obj in scene.objects:
            best = max(range(len(masks)), key=lambda i: iou(masks.mask(i), obj.mask), default=None)
            if best is not None and iou(masks.mask(best), obj.mask) >= 0.5:
                matched.setdefault((obj.shape, obj.colour), []).append(best)
        for members in matched.values():
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    i, j = members[a], members[b]
                    geometry.append(cues.geometry[i] - cues.geometry[j])
                    colour.append(cues.colour[i] - cues.colour[j])
                    if cues.clip is not None and cues.clip[i].any() and cues.clip[j].any():
                        u, v = cues.clip[i], cues.clip[j]
                        clip.append(1 - float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))
    rms = lambda rows: np.sqrt(np.mean(np.square(np.asarray(rows, np.float64)), axis=0))  # noqa: E731
    return {"pairs": len(geometry), "geometry": rms(geometry), "colour": rms(colour),
            "clip": float(np.sqrt(np.mean(np.square(clip)))) if clip else float("nan")}
