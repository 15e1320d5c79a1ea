"""Exemplar prompts (issue #26): the objects marked with an exemplar tool → every instance of their kind.

prompts (``Prompts.exemplar_boxes`` / ``exemplar_points``) → the exemplars' own instances (the
same box and click selection as ordinary prompts) → the image's instance cues (geometry and colour
cached beside the masks; CLIP crop embeddings when CLIP is there) → ``core.exemplars.match_kind``
→ one ``Selection`` per instance, the exemplars' own first. Once the image's cues are cached this
is a warm-click cost: no forward pass, no image download (docs/exemplars.md, *Speed*).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from fastsam_backend.core.exemplars import CUES_VERSION, InstanceCues, cues_current, instance_cues, match_kind
from fastsam_backend.core.masks import MaskSet
from fastsam_backend.core.selection import Selection, select_by_box, select_by_points
from fastsam_backend.errors import ModelUnavailable
from fastsam_backend.ls.prompts import Prompts
from fastsam_backend.service.options import ProjectOptions

if TYPE_CHECKING:
    from fastsam_backend.service.orchestrator import FastSAMService, ImageMasks

log = logging.getLogger(__name__)
RECIPE = f"exemplar-cues-v{CUES_VERSION}"


def cues_for(service: FastSAMService, found: ImageMasks) -> InstanceCues:
    """The image's instance cues: geometry and colour from the cache (computed once, from the
    image, which is fetched if this request did not have it), CLIP crop embeddings when CLIP works."""
    masks = found.masks

    def compute() -> dict[str, np.ndarray]:
        if found.deadline is not None:
            found.deadline.check("describing the instances for an exemplar prompt")
        found.image = found.image or service.images.load(found.ref)
        return instance_cues(found.image.pixels, masks)

    arrays = service.store.instance_arrays(found.key, RECIPE, compute)
    if not cues_current(arrays, len(masks)):  # a foreign entry under our key: never trusted
        arrays = compute()
    clip = None
    if service.models.zero_shot_unavailable() is None:
        try:
            clip = service.crop_embeddings(found)
        except ModelUnavailable as exc:  # CLIP failed to load in between: geometry and colour still answer
            log.warning("exemplar prompt without CLIP: %s", exc.message)
        if clip is not None and clip.shape[0] != len(masks):
            clip = None
    return InstanceCues(arrays["geometry"], arrays["colour"], clip)


def _smallest_under(masks: MaskSet, x: int, y: int) -> int | None:
    under = np.flatnonzero(masks.contains(x, y))
    return int(under[np.argmin(masks.areas[under])]) if under.size else None


def select_exemplars(service: FastSAMService, found: ImageMasks, prompts: Prompts,
                     options: ProjectOptions) -> list[Selection]:
    """One selection per instance of the exemplars' kind: each exemplar's own (as an ordinary box or
    click would select it) first, then the others, most similar first. Empty when no exemplar
    lies on an instance."""
    masks = found.masks
    if len(masks) == 0:
        return []
    h, w = masks.image_size
    own: list[Selection] = []
    for box in prompts.exemplar_boxes:
        picked = select_by_box(masks, box.in_pixels(w, h), rule=options.point_rule,
                               morphology=options.morphology, box_rule=options.box_rule)
        if picked is not None:
            own.append(picked)
    for point in prompts.exemplar_points:
        if point.positive and (picked := select_by_points(
                masks, np.array([point.in_pixels(w, h)]), np.array([True]), rule=options.point_rule,
                morphology=options.morphology)) is not None:
            own.append(picked)
    positives = list(dict.fromkeys(s.indices[0] for s in own))
    if not positives:
        return []
    negatives = [i for p in prompts.exemplar_points if not p.positive
                 and (i := _smallest_under(masks, *p.in_pixels(w, h))) is not None]
    match = match_kind(masks, cues_for(service, found), positives, negatives,
                       min_similarity=options.exemplar_min_similarity)
    answered = {s.indices[0] for s in own}
    selections = list({s.indices[0]: s for s in own}.values())
    selections += [Selection.of_instance(masks, i, float(match.similarity[i]))
                   for i in match.indices if i not in answered]
    return selections
