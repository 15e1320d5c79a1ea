"""CLIP alone on held-out scenes: text top-1 and zero-shot label top-1 with ground-truth masks.

What the issue-#25 rule for approximations reads (docs/weights.md): each CLIP variant
(``ClipConfig``: runtime, ``CLIP_INT8``, ``CLIP_IMAGE_SIZE``, ``CLIP_DENSE_SIZE``) embeds the
ground-truth masks of the same scenes through ``ClipScorer.embed_masks`` -- the path the backend
serves -- so FastSAM's misses do not enter the figures:

* **text top-1**: for each object whose caption ("red circle") is unique in its scene, whether the
  caption's embedding is nearest to that object's among the scene's objects;
* **zero-shot label top-1**: whether each object's best label over the scene generator's shape
  names (``labels.zero_shot``, as pre-annotation labels) is its own shape;
* **agreement** with the first variant (the reference): min / median cosine of the same
  objects' embeddings, and how often the zero-shot label is the same.

Objects of ``CLIP_MIN_MASK_AREA`` pixels or fewer are not scored by the backend and are left out
(the same ones for every variant).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.labels.zero_shot import zero_shot
from fastsam_backend.models.clip import ClipScorer
from fastsam_backend.quality.scenes import SHAPES, generate_scene


@dataclass
class ClipReport:
    """One variant's figures; ``embeddings``/``labels`` are kept to compare variants."""

    identity: str
    runtime: str
    text_hits: list[bool] = field(default_factory=list)
    label_hits: list[bool] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)  # per scene (n_scored, D) float32
    labels: list[np.ndarray] = field(default_factory=list)  # per scene (n_scored,) int

    def summary(self, reference: ClipReport | None = None) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {
            "clip": self.identity, "runtime": self.runtime,
            "text_top1": round(float(np.mean(self.text_hits)), 3) if self.text_hits else float("nan"),
            "text_n": len(self.text_hits),
            "zero_shot_top1": round(float(np.mean(self.label_hits)), 3) if self.label_hits else float("nan"),
            "zero_shot_n": len(self.label_hits)}
        if reference is not None and reference is not self and self.embeddings:
            cos = np.concatenate([(a * b).sum(axis=1) for a, b in zip(self.embeddings, reference.embeddings)])
            same = np.concatenate([a == b for a, b in zip(self.labels, reference.labels)])
            out.update(cosine_min=round(float(cos.min()), 4), cosine_median=round(float(np.median(cos)), 4),
                       label_agreement=round(float(same.mean()), 3))
        return out


def evaluate_clip(scorer: ClipScorer, seeds: Iterable[int]) -> ClipReport:
    """``scorer``'s figures on the scenes of ``seeds`` (``generate_scene``)."""
    shape_embeddings = scorer.embed_texts(list(SHAPES))  # loads it: its runtime is known from here
    report = ClipReport(scorer.identity, scorer.runtime)
    for seed in seeds:
        scene = generate_scene(seed)
        if not scene.objects:
            continue
        masks = MaskSet.from_dense(np.stack([o.mask for o in scene.objects]), np.ones(len(scene.objects)))
        emb = scorer.embed_masks(scene.image, masks).astype(np.float32)
        scored = np.flatnonzero(emb.any(axis=1))
        objects = [scene.objects[i] for i in scored]
        emb = emb[scored]
        labels, _ = zero_shot(emb, shape_embeddings, np.arange(len(SHAPES)), len(SHAPES))
        report.label_hits += [SHAPES[int(lab)] == o.shape for lab, o in zip(labels, objects)]
        report.embeddings.append(emb)
        report.labels.append(labels)
        counts = Counter(o.caption for o in objects)
        unique = [i for i, o in enumerate(objects) if counts[o.caption] == 1]
        if unique:
            texts = scorer.embed_texts([objects[i].caption for i in unique])
            best = (texts @ emb.T).argmax(axis=1)
            report.text_hits += [int(b) == i for b, i in zip(best, unique)]
    return report


def markdown(rows: list[dict[str, float | int | str]]) -> str:
    head = ["setting", "clip", "runtime", "text_top1", "zero_shot_top1", "cosine_min", "cosine_median",
            "label_agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(k, "—")) for k in head) + " |")
    return "\n".join(lines)
