"""Prompt-less pre-annotation of one image: every instance worth keeping, as regions of each
output tag of the config, labelled by the project's label mode (zero-shot with CLIP, refined by the
labels learned from the project's annotations where its examples show they beat zero-shot, the first
label, or none). Learned labels never change which instances are kept.

Called by ``FastSAMService.predict`` for a task without prompts (Retrieve Predictions, the
``preannotate`` command and its jobs); it reads the cache through the service, never HTTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastsam_backend.core.selection import preannotation_order
from fastsam_backend.errors import ModelUnavailable
from fastsam_backend.labels.zero_shot import LabelChoice, LabelPhrases, choose_labels
from fastsam_backend.ls.regions import regions_for
from fastsam_backend.settings import LabelMode

if TYPE_CHECKING:
    from fastsam_backend.labels.label_model import LabelModel
    from fastsam_backend.ls.labelconfig import LabelConfig, OutputTag
    from fastsam_backend.service.options import ProjectOptions
    from fastsam_backend.service.orchestrator import FastSAMService, ImageMasks


def preannotate_image(service: FastSAMService, found: ImageMasks, config: LabelConfig, options: ProjectOptions,
                 learned: LabelModel | None = None) -> list[dict]:
    """Prompt-less pre-annotation: every instance worth keeping, labelled, highest score first."""
    masks = found.masks
    order = preannotation_order(masks, min_area=options.preannotate_min_area,
                                min_score=options.preannotate_min_score,
                                max_instances=options.preannotate_max_instances)
    targets = config.pre_annotation_targets()
    choices = {tag.from_name: instance_labels(service, found, order, tag, options, learned) for tag in targets}
    result: list[dict[str, Any]] = []
    for rank, i in enumerate(order):
        mask = masks.mask(i)
        for tag in targets:
            choice = choices[tag.from_name]
            if choice.keep[rank]:
                result.extend(regions_for(tag, mask, choice.labels[rank], float(masks.scores[i]),
                                          masks.union_box([i]), options.polygon_style))
    return result


def instance_labels(service: FastSAMService, found: ImageMasks, order: list[int], tag: OutputTag,
                    options: ProjectOptions, learned: LabelModel | None = None) -> LabelChoice:
    """Per kept instance its label, by the project's label mode. Without CLIP, zero-shot labels
    are never guessed: a tag with one label gets it, else ``DEFAULT_LABEL``, else an error."""
    first = tag.labels[0] if tag.labels else None
    mode = options.label_mode
    if mode is LabelMode.NONE:
        return LabelChoice.uniform(None, len(order))
    if mode is LabelMode.FIRST or len(tag.labels) <= 1 or not order:
        return LabelChoice.uniform(first, len(order))
    if (why := service.models.zero_shot_unavailable()) is not None:
        if options.default_label:
            return LabelChoice.uniform(options.default_label, len(order))
        raise ModelUnavailable(
            f"zero-shot labels for <{tag.kind} name=\"{tag.from_name}\"> need CLIP, which is unavailable "
            f"({why}); make CLIP available, or set DEFAULT_LABEL (or the project's extra_params "
            f"default_label) to label every instance with it")
    if learned is not None and learned.learned(tag.labels):  # zero-shot, refined where learned is measurably better
        return service.learner.choose(found, order, tag, options, learned)
    phrases = LabelPhrases.of(tag)
    embeddings = service.crop_embeddings(found, order)[order]  # the kept instances only: the rest is never shown
    return choose_labels(embeddings, service.phrase_embeddings(phrases.phrases), phrases,
                         min_similarity=options.label_min_similarity, default_label=options.default_label)
