"""Annotations → label examples → each project's ``LabelModel``; the service's learning half.

An annotated region is matched to the cached instance masks of its image (the instance of best
IoU, at least ``LEARN_MATCH_IOU``; rectangles by box IoU) and that instance's cached CLIP crop
embedding and mask geometry are its example; a region no instance matches is embedded, and
described, from its own crop and mask. Examples are
stored per annotation (``example_store``); every process rebuilds a project's prototypes when the
project's revision moves. The revision is read from the store at most every ``LEARN_REFRESH_S`` per
project (a warm click makes no Redis round trip for it); a process that learned reads it again at
once, other processes' examples are seen up to ``LEARN_REFRESH_S`` late.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from fastsam_backend.core.geometry import mask_geometry
from fastsam_backend.core.masks import MaskSet
from fastsam_backend.errors import BackendError, ModelUnavailable
from fastsam_backend.images.cloud import ImageRef
from fastsam_backend.labels.decision import Decision, decide
from fastsam_backend.labels.example_store import AnnotationExamples, ExampleStore, store_errors
from fastsam_backend.labels.label_model import Example, LabelModel, label_scores, learned_label, refine_zero_shot
from fastsam_backend.labels.zero_shot import LabelChoice, LabelPhrases, choose_labels
from fastsam_backend.ls.annotations import DELETED, AnnotatedRegion, Annotation, AnnotationEvent
from fastsam_backend.ls.labelconfig import OutputTag, parse_label_config

if TYPE_CHECKING:
    from fastsam_backend.service.options import ProjectOptions
    from fastsam_backend.service.orchestrator import FastSAMService, ImageMasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnConfig:
    enabled: bool = True
    min_examples: int = 3  # LEARN_MIN_EXAMPLES
    match_iou: float = 0.5  # LEARN_MATCH_IOU
    min_similarity: float = 0.8  # LEARN_MIN_SIMILARITY: a click's learned label, while some labels are not learned
    refresh_s: float = 2.0  # LEARN_REFRESH_S: how long a project's revision is trusted without asking the store
    significance: float = 0.05  # LEARN_SIGNIFICANCE: learned labels decide a tag only at this sign-test p-value


def match_instance(masks: MaskSet, region: AnnotatedRegion) -> tuple[int, float]:
    """``(index, IoU)`` of the instance that best matches the region (``(-1, 0.0)`` if none)."""
    if len(masks) == 0:
        return -1, 0.0
    ys, xs = np.nonzero(region.mask)
    rbox = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    b = masks.boxes.astype(np.int64)
    ix = np.clip(np.minimum(b[:, 2], rbox[2]) - np.maximum(b[:, 0], rbox[0]), 0, None)
    iy = np.clip(np.minimum(b[:, 3], rbox[3]) - np.maximum(b[:, 1], rbox[1]), 0, None)
    if region.is_box:
        inter = ix * iy
        union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + (rbox[2] - rbox[0]) * (rbox[3] - rbox[1]) - inter
    else:
        inter = np.array([np.count_nonzero(region.mask[y0:y1, x0:x1] & crop) if ix[i] and iy[i] else 0
                          for i, (crop, (x0, y0, x1, y1)) in enumerate(zip(masks.crops, b.tolist()))])
        union = masks.areas + len(ys) - inter
    ious = inter / np.maximum(union, 1)
    best = int(np.argmax(ious))
    return best, float(ious[best])


class Learner:
    """One per service: learns from annotation events, serves each project's current model."""

    def __init__(self, service: FastSAMService, store: ExampleStore, config: LearnConfig) -> None:
        self.service, self.store, self.config = service, store, config
        self._models: dict[str, LabelModel] = {}
        self._revisions: dict[str, tuple[float, int]] = {}  # project -> (when read, monotonic; revision)
        self._forgotten = 0  # bumped by every _forget_revision
        self._lock = threading.Lock()
        self.clock = time.monotonic  # tests step it

    @property
    def clip_id(self) -> str | None:
        clip = self.service.clip
        return clip.identity if clip is not None and self.config.enabled else None

    def unavailable(self) -> str | None:
        """Why annotations teach nothing here (None: they do)."""
        if not self.config.enabled:
            return "label learning is off (LEARN_ENABLED=false)"
        if self.service.clip is None:
            return "label learning needs CLIP (CLIP_ENABLED=false here)"
        return None

    # ------------------------------------------------------------- serving
    def model_for(self, project: str | None) -> LabelModel | None:
        """The project's prototypes at its current revision (None: learning off, no project, or no
        example yet). A store that cannot be read leaves the last model this process built."""
        clip_id = self.clip_id
        if clip_id is None or not project:
            return None
        with self._lock:
            known = self._models.get(project)
        try:
            revision = self._revision(project)
            if known is None or known.revision != revision:
                examples = self.store.load(project, clip_id) if revision else []
                known = LabelModel.fit(examples, min_examples=self.config.min_examples, revision=revision)
                with self._lock:
                    self._models[project] = known
        except Exception as exc:  # Redis down: serve what we have (zero-shot when nothing)
            log.warning("project %s: label examples unreadable (%s: %s); using the last model built here",
                        project, type(exc).__name__, exc)
        return known if known is not None and known.labels else None

    def _revision(self, project: str) -> int:
        """The project's store revision, read at most every ``refresh_s`` (0: every time)."""
        now = self.clock()
        with self._lock:
            memo, forgotten = self._revisions.get(project), self._forgotten
        if memo is not None and now - memo[0] < self.config.refresh_s:
            return memo[1]
        revision = self.store.revision(project)
        with self._lock:
            if self._forgotten == forgotten:  # else a write here raced this read: it may be older
                self._revisions[project] = (now, revision)
        return revision

    def _forget_revision(self, project: str) -> None:
        """This process changed the project's examples: the next read asks the store."""
        with self._lock:
            self._revisions.pop(project, None)
            self._forgotten += 1

    def decision(self, model: LabelModel, tag: OutputTag) -> Decision:
        """Whether the model's learned labels or zero-shot label the tag's instances (``labels.decision``),
        memoised on the model (one revision) per tag's labels and phrases."""
        phrases = LabelPhrases.of(tag)
        key = (tag.labels, phrases.phrases)
        if (known := model.decisions.get(key)) is not None:
            return known
        emb = np.stack([np.asarray(ex.embedding, np.float32).reshape(-1) for ex in model.examples]) \
            if model.examples else np.zeros((0, 1), np.float32)
        text = label_scores(emb, self.service.phrase_embeddings(phrases.phrases), phrases.owner, len(phrases.labels)) \
            if len(emb) else np.zeros((0, len(tag.labels)), np.float32)
        found = decide(model, tag.labels, text, alpha=self.config.significance)
        model.decisions[key] = found
        return found

    def choose(self, found: ImageMasks, order: list[int], tag: OutputTag, options: ProjectOptions,
               model: LabelModel) -> LabelChoice:
        """Labels of the instances ``order``: zero-shot's, refined by the learned labels where the
        project's examples show they beat zero-shot (``decision``); keep is always zero-shot's."""
        embeddings = self.service.crop_embeddings(found, order)[order].astype(np.float32)
        every = LabelPhrases.of(tag)
        phrase_emb = self.service.phrase_embeddings(every.phrases)
        zero = choose_labels(embeddings, phrase_emb, every, min_similarity=options.label_min_similarity,
                             default_label=options.default_label)
        if not self.decision(model, tag).learned_decides:
            return zero
        text = label_scores(embeddings, phrase_emb, every.owner, len(every.labels))
        geometry = mask_geometry(found.masks, order) if model.geometry is not None else None
        return refine_zero_shot(model, embeddings, tag.labels, zero, text, geometry)

    def label_of_selection(self, found: ImageMasks, indices: tuple[int, ...], labels: tuple[str, ...],
                           model: LabelModel) -> str | None:
        """The learned label of a click's or box's answer (its largest instance), when it places."""
        if not indices or not model.learned(labels):
            return None
        i = max(indices, key=lambda k: int(found.masks.areas[k]))
        geometry = mask_geometry(found.masks, [i]) if model.geometry is not None else None  # one instance
        return learned_label(model, self.service.crop_embeddings(found, [i])[[i]].astype(np.float32), labels,
                             min_similarity=self.config.min_similarity, geometry=geometry)[0]

    def health(self) -> dict[str, Any]:
        """``/health``'s ``learning.projects``: per project whose model this process built, its examples
        per label, which are learned, and per tag decided here whether learned or zero-shot labels it, and why."""
        with self._lock:
            models = dict(self._models)
        out: dict[str, Any] = {}
        for project, model in sorted(models.items()):
            if not model.labels:
                continue
            out[project] = {"revision": model.revision, "min_examples": model.min_examples,
                            "examples_per_label": {lab: model.count(lab) for lab in model.labels},
                            "learned_labels": list(model.learned(model.labels)),
                            "tags": {"/".join(labels): d.as_dict() for (labels, _), d in list(model.decisions.items())}}
        return out

    # ------------------------------------------------------------ learning
    def learn(self, event: AnnotationEvent) -> dict[str, Any]:
        """Apply one webhook event; the summary is the webhook's answer. A store that fails is a 503
        (Label Studio logs it; the annotation is learned from when it is saved again, or by ``fit``)."""
        if (why := self.unavailable()) is not None:
            return {"learned": False, "reason": why}
        try:
            if event.action == DELETED:  # before the deletion: a create still being learned stores nothing
                self.store.bury(event.project, list(event.deleted))
            return self._learn(event)
        except store_errors() as exc:
            raise BackendError(f"label examples could not be stored: Redis failed ({type(exc).__name__})",
                               status=503) from None
        finally:
            self._forget_revision(event.project)

    def _learn(self, event: AnnotationEvent) -> dict[str, Any]:
        project = event.project
        if event.action == DELETED:
            gone = self.store.delete(project, list(event.deleted))
            log.info("project %s: %d of %d deleted annotations had label examples", project, gone, len(event.deleted))
            return {"learned": True, "project": project, "deleted": gone, **self._summary(project)}
        config_xml = event.label_config or self.service.options_for(project).label_config
        image_key = parse_label_config(config_xml).image_key if config_xml else "image"
        counts = {"annotations": 0, "examples": 0, "matched": 0, "own_crops": 0, "failed": 0}
        for ann in event.annotations:
            try:
                item = self._examples(ann, image_key, counts)
            except BackendError as exc:
                counts["failed"] += 1
                log.warning("project %s annotation %s: no examples (%s)", project, ann.id, exc.message)
                continue
            counts["annotations"] += 1
            if item.examples:
                self.store.put(project, item)
            else:
                self.store.delete(project, [ann.id])
        log.info("project %s: %s", project, counts)
        if counts["failed"] and not counts["annotations"]:
            raise ModelUnavailable(f"no annotation of the event could be learned from ({counts['failed']} "
                                   "failed; see the backend log)", status=503)
        return {"learned": True, "project": project, **counts, **self._summary(project, config_xml)}

    def _summary(self, project: str, config_xml: str | None = None) -> dict[str, Any]:
        self._forget_revision(project)  # the examples just changed here
        model = self.model_for(project)
        labels = {} if model is None else {lab: model.count(lab) for lab in model.labels}
        out = {"revision": self.store.revision(project), "examples_per_label": labels,
               "min_examples": self.config.min_examples}
        if model is not None and config_xml:  # decided now, so /health says who labels the project's tags
            out["decides"] = {tag.from_name: self.decision(model, tag).as_dict()["decides"]
                              for tag in parse_label_config(config_xml).pre_annotation_targets()
                              if len(tag.labels) > 1 and model.learned(tag.labels)}
        return out

    def _examples(self, ann: Annotation, image_key: str, counts: dict[str, int]) -> AnnotationExamples:
        clip_id = self.clip_id
        assert clip_id is not None
        if ann.cancelled or not ann.regions:
            return AnnotationExamples(ann.id, ann.task_id, clip_id, ())
        url = ann.task_data.get(image_key)
        if not isinstance(url, str) or not url:
            raise BackendError(f"task {ann.task_id} has no data.{image_key} (the image URL)", status=400)
        found = self.service.masks_for(ImageRef.of(url, ann.task_id))
        regions = [_at_size(region, found.masks.image_size) for region in ann.regions]
        matches = [match_instance(found.masks, region) for region in regions]
        embeddings = self.service.crop_embeddings(  # only the instances the regions matched
            found, [i for i, iou in matches if i >= 0 and iou >= self.config.match_iou])
        examples = []
        for region, (i, iou) in zip(regions, matches):
            if i >= 0 and iou >= self.config.match_iou and embeddings[i].any():
                vec, geo = embeddings[i].astype(np.float32), mask_geometry(found.masks, [i])[0]
                counts["matched"] += 1
            else:
                vec, geo = self._own_crop(found, region)
                counts["own_crops"] += 1
            if vec.any():
                examples.append(Example(region.label, vec, geo))
        counts["examples"] += len(examples)
        return AnnotationExamples(ann.id, ann.task_id, clip_id, tuple(examples))

    def _own_crop(self, found: ImageMasks, region: AnnotatedRegion) -> tuple[np.ndarray, np.ndarray]:
        """``(D,)`` CLIP embedding and ``(G,)`` geometry of the region's own mask."""
        clip = self.service.models.require_clip()
        found.image = found.image or self.service.images.load(found.ref)
        own = MaskSet.from_dense(region.mask[None], np.ones(1, np.float32))
        return clip.embed_masks(found.image.pixels, own)[0].astype(np.float32), mask_geometry(own)[0]


def _at_size(region: AnnotatedRegion, size: tuple[int, int]) -> AnnotatedRegion:
    """The region's mask at the image's decoded size (LS's original_* may differ, e.g. EXIF)."""
    if region.mask.shape == size:
        return region
    mask = cv2.resize(region.mask.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return AnnotatedRegion(region.label, region.kind, mask.astype(bool), region.is_box)
