"""Exemplar prompts: which cached instances are of the same kind as the marked one(s). Pure numpy.

An instance is described by three cues, each computed once per image and cached
(``instance_cues`` for geometry and colour; CLIP crop embeddings are the service's):

- **geometry**: ``geometry.mask_geometry``'s shape descriptors (size, elongation, solidity,
  outline harmonics, holes …) of the mask crop;
- **colour**: mean and spread of the masked pixels in CIELAB (``colour_stats``);
- **clip** (optional): the crop's CLIP embedding; an all-zero row (too small to embed) or no CLIP
  at all leaves the cue out.

For each cue the distance of an instance to the nearest exemplar is divided by that cue's
*within-kind* spread (``SCALES``: how far apart two objects of one kind lie; measured on the
development scenes of ``quality/exemplar_scenes.py``, never on held-out ones). The combined
distance ``D`` is the root of the sum of the squared scaled distances over the cues (a look-alike
differs in one cue, say colour, and that one cue must be enough to reject it; a mean would
dilute it). Similarity ``exp(-D² / 2)``: 1 for a twin, about 0.6 one within-kind spread away.

The cut is adaptive per image: sorted by ``D``, the instances are split at the widest gap (on a log
scale) between ``D_SURE`` (always the same kind) and the distance of ``min_similarity``
(never the same kind): the image's own look-alike distractors decide where that gap is. A
negative exemplar (a click "not this kind") rejects every instance nearer to it than to the
positive exemplars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from fastsam_backend.core.geometry import FEATURES, GEOMETRY_VERSION, mask_geometry
from fastsam_backend.core.masks import MaskSet

CUES_VERSION = 1  # bump when colour_stats or the geometry layout changes: cached cues are recomputed
COLOUR_FEATURES = ("L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std")

# Per-feature within-kind spread of the geometry descriptor and of the colour statistics, and the
# within-kind CLIP cosine distance: the root mean square difference between two objects of one kind
# in one image, ``quality.exemplar_eval.calibrate`` on 30 development scenes with the fixture models
# (182 pairs), floored (a feature that never varied within a kind, e.g. the holes of a disc, would
# otherwise weigh without bound), then widened by ``SPREAD`` so that twins lie well within D_SURE;
# CLIP's by twice that (the fixture CLIP's twins vary more than their geometry and colour do).
# SPREAD and the CLIP factor were chosen on those development scenes (spreads 2, 2.5, 3; factor
# 1, 2: one exemplar box, mean F1 0.847-0.971); held-out scenes were not looked at.
_GEOMETRY_RMS = (0.2498, 0.0939, 0.1591, 0.1253, 0.0373, 0.0532, 0.071, 0.0157, 0.0, 0.0301, 0.8571, 0.8787,
                 0.9061, 0.0293, 0.0484, 0.0021, 0.0203, 0.0039, 0.0052, 0.0072, 0.0028, 0.0018, 0.0022)
_GEOMETRY_FLOOR = dict.fromkeys(FEATURES, 0.02) | {"log1p_holes": 0.1, "hole_fraction": 0.05}
_COLOUR_RMS = (4.383, 9.6183, 8.2344, 1.301, 1.9279, 1.9325)
SPREAD = 2.5
# Hu 2-4 are left out (an infinite spread): log-scaled, they are near-zero moments of symmetric
# outlines (squares, circles, hexagons) whose log swings by orders of magnitude with a pixel.
_UNSTABLE = ("hu2", "hu3", "hu4")
GEOMETRY_SCALES = SPREAD * np.where([f in _UNSTABLE for f in FEATURES], np.inf,
                                    np.maximum(np.array(_GEOMETRY_RMS), [_GEOMETRY_FLOOR[f] for f in FEATURES]))
COLOUR_SCALES = SPREAD * np.maximum(np.array(_COLOUR_RMS), 1.0)
CLIP_SCALE = 2 * SPREAD * 0.0734
# the combined distance up to which an instance is the exemplar's kind whatever the image holds
D_SURE = 1.0
MIN_SPLIT_GAP = 1.3  # a ratio between neighbours' distances below this is no gap: take all up to the cap
CONTAINED = 0.5  # an instance sharing this much of its area with an exemplar or a pick is a part/duplicate


@dataclass(frozen=True)
class InstanceCues:
    """Per-instance cues of one image: ``geometry`` ``(N, G)``, ``colour`` ``(N, C)``, ``clip`` ``(N, D)``
    or None (CLIP off). Rows line up with the image's ``MaskSet``."""

    geometry: np.ndarray
    colour: np.ndarray
    clip: np.ndarray | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return ("clip", "geometry", "colour") if self.clip is not None else ("geometry", "colour")


@dataclass(frozen=True)
class KindMatch:
    """``indices``: the instances of the exemplars' kind, exemplars first, then most similar first;
    ``similarity`` ``(N,)`` of every instance; ``cut``: the combined distance the image's split chose."""

    indices: tuple[int, ...]
    similarity: np.ndarray
    cut: float


def colour_stats(pixels: np.ndarray, masks: MaskSet) -> np.ndarray:
    """``(N, 6)`` float32: mean and standard deviation of each mask's pixels in CIELAB (L 0–100,
    a/b about -128–127). ``pixels``: ``(H, W, 3)`` uint8 RGB (a grey image is taken as RGB)."""
    out = np.zeros((len(masks), len(COLOUR_FEATURES)), np.float32)
    if len(masks) == 0:
        return out
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    lab = cv2.cvtColor(np.ascontiguousarray(pixels[..., :3], dtype=np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    for i, ((x0, y0, x1, y1), crop) in enumerate(zip(masks.boxes.tolist(), masks.crops)):
        values = lab[y0:y1, x0:x1][crop]
        if len(values):
            out[i, :3] = values.mean(axis=0)
            out[i, 3:] = values.std(axis=0)
    return out


def instance_cues(pixels: np.ndarray, masks: MaskSet) -> dict[str, np.ndarray]:
    """The cacheable cues of every instance (geometry and colour), as named arrays."""
    return {"geometry": mask_geometry(masks), "colour": colour_stats(pixels, masks),
            "version": np.array([CUES_VERSION, GEOMETRY_VERSION], np.int32)}


def cues_current(arrays: dict[str, np.ndarray], n: int) -> bool:
    """Whether cached cue arrays are of this layout and for ``n`` instances."""
    version = arrays.get("version")
    return (version is not None and version.tolist() == [CUES_VERSION, GEOMETRY_VERSION]
            and arrays.get("geometry") is not None and arrays["geometry"].shape == (n, len(FEATURES))
            and arrays.get("colour") is not None and arrays["colour"].shape == (n, len(COLOUR_FEATURES)))


def _scaled_sq(values: np.ndarray, refs: Sequence[int], scales: np.ndarray | float) -> np.ndarray:
    """``(N, R)``: squared distance of each instance to each reference, per-feature scaled, summed
    over features and divided by their number (a mean: cues with many features weigh as one)."""
    x = np.asarray(values, np.float64) / scales
    diff = x[:, None, :] - x[None, list(refs), :]
    return (diff * diff).mean(axis=2)


def cue_distances(cues: InstanceCues, refs: Sequence[int]) -> dict[str, np.ndarray]:
    """Per cue, ``(N, R)`` squared scaled distance of each instance to each reference instance;
    NaN where a CLIP row is all zero (not embedded)."""
    out = {"geometry": _scaled_sq(cues.geometry, refs, GEOMETRY_SCALES),
           "colour": _scaled_sq(cues.colour, refs, COLOUR_SCALES)}
    if cues.clip is not None:
        emb = np.asarray(cues.clip, np.float64)
        norms = np.linalg.norm(emb, axis=1)
        unit = emb / np.maximum(norms, 1e-12)[:, None]
        d = (1.0 - unit @ unit[list(refs)].T) / CLIP_SCALE
        d = d * d
        missing = norms <= 0
        d[missing, :] = np.nan
        d[:, missing[list(refs)]] = np.nan
        out["clip"] = d
    return out


def combined_distance(cues: InstanceCues, refs: Sequence[int]) -> np.ndarray:
    """``(N,)`` combined distance of each instance to its nearest reference (see the module doc).
    A cue missing for a pair (a CLIP row not embedded) is left out of that pair, and the others
    scaled up to stand for it."""
    per_cue = cue_distances(cues, refs)
    stack = np.stack([per_cue[name] for name in cues.names])  # (C, N, R)
    present = np.isfinite(stack)
    total = np.where(present, stack, 0.0).sum(axis=0) * len(cues.names) / np.maximum(present.sum(axis=0), 1)
    return np.sqrt(total.min(axis=1))


def similarity_of(distance: np.ndarray | float) -> np.ndarray:
    return np.exp(-np.square(distance) / 2.0)


def distance_of(similarity: float) -> float:
    """The combined distance whose similarity is ``similarity`` (inf for 0)."""
    return math.inf if similarity <= 0 else math.sqrt(-2.0 * math.log(min(similarity, 1.0)))


def split_distance(distances: np.ndarray, *, sure: float | None = None, cap: float = math.inf) -> float:
    """The cut: instances at or below it are the kind. At the widest gap (ratio of neighbours) of the
    sorted ``distances`` from the last one at or below ``sure`` (``D_SURE``) to the first past ``cap``;
    where no gap reaches ``MIN_SPLIT_GAP``, ``sure``."""
    sure = D_SURE if sure is None else sure
    d = np.sort(np.asarray(distances, np.float64)[np.isfinite(distances)])
    if cap <= sure:
        return cap
    # the neighbours bracketing each gap, from the last one at or below ``sure`` to the first past ``cap``
    below, above = d[d <= sure], d[(d > sure) & (d <= cap)]
    beyond = d[d > cap]
    seq = np.concatenate([[below[-1] if len(below) else sure * 0.5], above,
                          [beyond[0] if len(beyond) else cap * 2.0]])
    ratios = seq[1:] / np.maximum(seq[:-1], 1e-9)
    k = int(np.argmax(ratios))
    if ratios[k] < MIN_SPLIT_GAP:
        return sure  # a continuum from the twins to past the cap: only the sure ones
    return float(seq[k]) if k > 0 or len(below) else sure


def _overlap(masks: MaskSet, i: int, j: int) -> int:
    """Pixels masks ``i`` and ``j`` share."""
    ax0, ay0, ax1, ay1 = masks.boxes[i].tolist()
    bx0, by0, bx1, by1 = masks.boxes[j].tolist()
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if x0 >= x1 or y0 >= y1:
        return 0
    a = masks.crops[i][y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
    b = masks.crops[j][y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    return int(np.count_nonzero(a & b))


def _entangled(masks: MaskSet, i: int, others: Sequence[int]) -> bool:
    """Whether ``i`` shares ``CONTAINED`` of its own or of another's area with one of ``others``
    (a part, a whole, a duplicate of an instance already answered). Only the instances whose
    boxes meet ``i``'s are looked at pixel by pixel."""
    if not others:
        return False
    idx = np.asarray(others, np.int64)
    b, bi = masks.boxes[idx], masks.boxes[i]
    meets = (b[:, 0] < bi[2]) & (bi[0] < b[:, 2]) & (b[:, 1] < bi[3]) & (bi[1] < b[:, 3])
    areas = masks.areas
    for j in idx[meets]:
        shared = _overlap(masks, i, int(j))
        if shared and shared >= CONTAINED * min(areas[i], areas[j]):
            return True
    return False


def match_kind(masks: MaskSet, cues: InstanceCues, positives: Sequence[int], negatives: Sequence[int] = (),
               *, min_similarity: float = 0.3) -> KindMatch:
    """The instances of the kind the ``positives`` (instance indices) show, ``negatives`` excluded.

    Exemplars are always in the answer; every other instance is answered when its combined
    distance is within the image's cut (``split_distance``) and its similarity at least
    ``min_similarity``, it is nearer to the positives than to any negative, and it is not a part,
    whole or duplicate of an exemplar or of an instance answered before it.
    """
    positives = list(dict.fromkeys(int(i) for i in positives))
    negatives = [int(i) for i in dict.fromkeys(negatives) if int(i) not in positives]
    n = len(masks)
    if not positives or n == 0:
        return KindMatch(tuple(positives), np.zeros(n), 0.0)
    distance = combined_distance(cues, positives)
    distance[positives] = 0.0
    if negatives:
        nearer_negative = combined_distance(cues, negatives) < distance
        distance[nearer_negative | np.isin(np.arange(n), negatives)] = np.inf
    candidates = np.ones(n, bool)
    candidates[positives] = False
    b, p = masks.boxes, masks.boxes[positives]
    near = ((b[:, None, 0] < p[None, :, 2]) & (p[None, :, 0] < b[:, None, 2])
            & (b[:, None, 1] < p[None, :, 3]) & (p[None, :, 1] < b[:, None, 3])).any(axis=1)
    for i in np.flatnonzero(candidates & near):
        if _entangled(masks, int(i), positives):  # parts of the exemplar, the scene around it
            candidates[i] = False
    cut = split_distance(distance[candidates], cap=distance_of(min_similarity))
    within = np.flatnonzero(candidates & (distance <= cut))
    group = np.concatenate([positives, within[np.argsort(distance[within], kind="stable")]])
    # Nearest first, each taken unless entangled with one taken before it. Only the ones whose
    # boxes meet an earlier one's can be (compared pixel by pixel, in order); most meet none.
    b = masks.boxes[group]
    earlier = np.tril((b[:, None, 0] < b[None, :, 2]) & (b[None, :, 0] < b[:, None, 2])
                      & (b[:, None, 1] < b[None, :, 3]) & (b[None, :, 1] < b[:, None, 3]), -1)
    taken = np.ones(len(group), bool)
    for g in np.flatnonzero(earlier[len(positives):].any(axis=1)) + len(positives):
        near = np.flatnonzero(earlier[g] & taken)
        taken[g] = not near.size or not _entangled(masks, int(group[g]), group[near].tolist())
    return KindMatch(tuple(group[taken].tolist()), similarity_of(distance), cut)
