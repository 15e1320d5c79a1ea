"""Interactive answers for one image: a click's, a box's, a text prompt's or an exemplar's regions.

Called by ``FastSAMService.predict`` for a request with a context (the labeling UI's smart tools);
prompts → the image's cached masks → one selection per prompt (``core.selection``, or
``service.exemplars``) → regions of the tags ``INTERACTIVE_OUTPUT`` names (``ls.answers``). The
pre-annotation counterpart is ``prelabel.py``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from fastsam_backend.core.selection import (
    Selection,
    names_several,
    select_by_box,
    select_by_points,
    select_by_text_prompt,
    text_candidates,
)
from fastsam_backend.labels.zero_shot import label_named_in
from fastsam_backend.ls.answers import answer_regions, answer_tags
from fastsam_backend.service.exemplars import select_exemplars

if TYPE_CHECKING:
    from fastsam_backend.labels.label_model import LabelModel
    from fastsam_backend.ls.labelconfig import LabelConfig, OutputTag
    from fastsam_backend.ls.prompts import Prompts
    from fastsam_backend.service.options import ProjectOptions
    from fastsam_backend.service.orchestrator import FastSAMService, ImageMasks

log = logging.getLogger(__name__)


def answer_prompts(service: FastSAMService, found: ImageMasks, prompts: Prompts, config: LabelConfig,
                   options: ProjectOptions, task_id: Any, learned: LabelModel | None = None) -> list[dict[str, Any]]:
    """The regions answering ``prompts`` on ``found``'s image, in the tags ``INTERACTIVE_OUTPUT``
    names: exemplars (every instance of their kind), else a text prompt (narrowed by boxes and
    clicks), else each box, else the clicks together. One label per tag for the whole answer."""
    tags = answer_tags(config, options.interactive_output)
    if not prompts:
        return []
    masks = found.masks
    h, w = masks.image_size
    points = np.array([p.in_pixels(w, h) for p in prompts.points], dtype=np.int64).reshape(-1, 2)
    positive = np.array([p.positive for p in prompts.points], dtype=bool)
    selections: list[Selection | None] = []
    text = " ".join(t.text for t in prompts.texts)
    if prompts.has_exemplars:  # every instance like the marked one(s); ordinary prompts with them are ignored
        text = ""
        selections += select_exemplars(service, found, prompts, options)
    elif prompts.texts:
        selections.append(_select_text(service, found, text, prompts, points, positive, options))
    elif prompts.boxes:
        for box in prompts.boxes:
            selections.append(select_by_box(masks, box.in_pixels(w, h), points, positive,
                                            rule=options.point_rule, morphology=options.morphology,
                                            box_rule=options.box_rule))
    elif len(points):
        selections.append(select_by_points(masks, points, positive, rule=options.point_rule,
                                           morphology=options.morphology))
    chosen = [s for s in selections if s is not None]

    labels: dict[str, str | None] = {}  # per tag: the same for every region of the answer

    def label_of(tag: OutputTag) -> str | None:
        if tag.from_name not in labels:
            labels[tag.from_name] = pick_label(tag)
        return labels[tag.from_name]

    def pick_label(tag: OutputTag) -> str | None:
        label = (label_named_in(text, tag.labels) if text else None) or tag.match_label(
            prompts.exemplar_label if prompts.has_exemplars else prompts.label)
        if label is None and learned is not None and chosen:  # no label on the prompt: the learned one
            label = service.learner.label_of_selection(found, chosen[0].indices, tag.labels, learned)
        return label or options.default_label or (tag.labels[0] if tag.labels else None)

    if len(chosen) < len(selections):
        log.info("task %s: %d of %d prompts matched no mask (%d instances on the image; a click on "
                 "background or an object the model did not find)", task_id,
                 len(selections) - len(chosen), len(selections), len(masks))
    return answer_regions(tags, chosen, label_of, options.polygon_style)

def _select_text(service: FastSAMService, found: ImageMasks, text: str, prompts: Prompts, points: np.ndarray,
                 positive: np.ndarray, options: ProjectOptions) -> Selection | None:
    masks = found.masks
    if len(masks) == 0:
        return None
    h, w = masks.image_size
    candidates = text_candidates(masks, [box.in_pixels(w, h) for box in prompts.boxes], points, positive)
    embeddings = service.crop_embeddings(found, np.flatnonzero(candidates)).astype(np.float32)
    sims = embeddings @ service.phrase_embeddings((text,))[0]
    sims[~embeddings.any(axis=1)] = -np.inf  # too small to score, or not a candidate (never embedded)
    return select_by_text_prompt(masks, sims, candidates, several=names_several(text), margin=options.text_margin)
