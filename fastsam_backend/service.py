"""The backend's work, HTTP-free: tasks + context → one LS prediction per task.

request → prompts → cached masks → selection → LS regions. Built once per worker
process by ``build_service`` and shared by all requests (thread-safe: the models
serialise inference, the store single-flights cold images).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import metrics
from .cache import MaskStore, cache_key, make_cache
from .clip_scorer import ClipConfig, ClipScorer
from .errors import BackendError, BadRequest, ImageError, ModelUnavailable
from .images import ImageLoader, ImageSourceConfig, LoadedImage
from .labelconfig import LabelConfig, parse_label_config
from .labeling import LabelPhrases, label_named_in, zero_shot
from .masks import MaskSet
from .options import ProjectOptions
from .prompts import Prompts, parse_context
from .results import brush_region, regions_for
from .segmenter import Segmenter, SegmenterConfig, missing_weights_message
from .selection import Selection, names_several, select_by_box, select_by_points, select_by_text
from .settings import LabelMode, Settings

log = logging.getLogger(__name__)


@dataclass
class ImageMasks:
    """The cached masks of one task image, and the image itself once it had to be fetched."""

    url: str
    digest: str
    masks: MaskSet
    image: LoadedImage | None = None


class FastSAMService:
    """One per worker process; see ``build_service``."""

    def __init__(self, settings: Settings, segmenter: Segmenter, store: MaskStore, images: ImageLoader,
                 clip: ClipScorer | None = None) -> None:
        self.settings = settings
        self.segmenter = segmenter
        self.store = store
        self.images = images
        self.clip = clip
        self._defaults = ProjectOptions.defaults(settings)
        self._projects: dict[str, ProjectOptions] = {}
        self._lock = threading.Lock()
        self._phrases: dict[tuple[str, ...], np.ndarray] = {}
        self._clip_warned = False

    # ----------------------------------------------------------------- setup
    @property
    def model_version(self) -> str:
        """Checkpoint identity and every parameter that changes outputs (LS re-predicts when it changes)."""
        s = self.settings
        version = (f"{self.segmenter.identity}-i{s.imgsz}-c{s.conf:g}-u{s.iou:g}-d{s.max_det}"
                   f"-{s.point_rule.value}{'-m' if s.morphology else ''}")
        if self.clip is not None and s.label_mode is LabelMode.CLIP and self.clip.available():
            version += f"+{self.clip.identity}"  # zero-shot labels depend on it
        return version

    def setup(self, project: str | None, hostname: str | None = None, access_token: str | None = None,
              extra_params: Any = None, schema: str | None = None) -> str:
        """Remember LS's host/token as image-download fallback and the project's overrides; no model load."""
        self.images.set_fallback(hostname, access_token)
        if extra_params is not None and not isinstance(extra_params, dict):
            raise BadRequest("extra_params must be an object or null")
        options = self._defaults.with_overrides(extra_params, schema)
        if project:
            with self._lock:
                self._projects[project_id(project)] = options
        return self.model_version

    def fit(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """FastSAM is not fine-tuned from annotations; webhooks are acknowledged and ignored."""
        log.info("webhook %s acknowledged (FastSAM is zero-shot: no training)", event)
        return {"trained": False, "reason": "FastSAM is used zero-shot; annotations do not change it"}

    def segmenter_missing_message(self) -> str:
        cfg = self.segmenter.config
        return missing_weights_message(cfg.weights, cfg.model_dir)

    def options_for(self, project: str | None) -> ProjectOptions:
        with self._lock:
            found = self._projects.get(project_id(project)) if project else None
        return found or self._defaults

    # --------------------------------------------------------------- predict
    def predict(self, tasks: list[dict[str, Any]], context: Any, label_config: str | None,
                project: str | None = None) -> list[dict[str, Any]]:
        """One prediction per task: ``{"result": [...], "score": float, "model_version": str}``.

        A batch of several tasks (pre-annotation) never loses the predictions it made. A task
        whose image cannot be had gets ``{"error": "tasks[i] (id …): …"}`` in its place; once
        ``BATCH_TIME_BUDGET_S`` is spent (Label Studio gives up on /predict after 100 s and would
        drop the whole batch), the tasks not yet started get such an entry too. Label Studio logs
        those entries, stores no prediction for them, and sends them again on its next run (it
        skips the tasks that have a prediction of this model version). A single task, an
        interactive request, or a batch where every task fails is answered with the error (4xx).
        """
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("tasks must be a non-empty list")
        options = self.options_for(project)
        config = parse_label_config(label_config or options.label_config)
        prompts = parse_context(context)
        interactive = context is not None
        if interactive and config.brush is None:
            raise BadRequest("label_config has no BrushLabels tag bound to the image: nowhere to put masks")
        if interactive or len(tasks) == 1:
            return [self._predict_task(task, i, config, prompts if interactive else None, options)
                    for i, task in enumerate(tasks)]

        budget = self.settings.batch_time_budget_s
        predictions: list[dict[str, Any]] = []
        first_failure: BackendError | None = None
        started, slowest = time.monotonic(), 0.0
        for i, task in enumerate(tasks):
            elapsed = time.monotonic() - started
            if budget and i and elapsed + slowest > budget:  # the first task always runs
                left = len(tasks) - i
                log.warning("batch of %d tasks: %d answered in %.0f s (BATCH_TIME_BUDGET_S %g); the %d left "
                            "are sent again on Label Studio's next run", len(tasks), i, elapsed, budget, left)
                metrics.BATCH_TASKS.labels(outcome="deferred").inc(left)
                predictions += [{"error": f"{_task_name(t, i + j)}: not started, the request's time budget "
                                          f"(BATCH_TIME_BUDGET_S={budget:g} s) was spent; retry it"}
                                for j, t in enumerate(tasks[i:])]
                break
            task_started = time.monotonic()
            try:
                predictions.append(self._predict_task(task, i, config, None, options))
                metrics.BATCH_TASKS.labels(outcome="predicted").inc()
            except (ImageError, BadRequest) as exc:
                log.warning("batch of %d tasks: %s skipped: %s", len(tasks), _task_name(task, i), exc.message)
                metrics.BATCH_TASKS.labels(outcome="failed").inc()
                predictions.append({"error": f"{_task_name(task, i)}: {exc.message}"})
                first_failure = first_failure or exc
            slowest = max(slowest, time.monotonic() - task_started)
        if first_failure is not None and all("error" in p for p in predictions):
            message = f"all {len(tasks)} tasks failed; {predictions[0]['error']}"
            raise type(first_failure)(message, status=first_failure.status) from first_failure
        return predictions

    def _predict_task(self, task: Any, index: int, config: LabelConfig, prompts: Prompts | None,
                      options: ProjectOptions) -> dict[str, Any]:
        """``prompts`` None: pre-annotation (no context)."""
        found = self.masks_for(task_image_url(task, config, index))
        if prompts is not None:
            result = self._answer_prompts(found, prompts, config, options, task.get("id"))
        else:
            result = self._pre_annotate(found, config, options)
        scores = [r["score"] for r in result if "score" in r]
        return {"result": result, "score": float(np.mean(scores)) if scores else 0.0,
                "model_version": self.model_version}

    def masks_for(self, image_url: str) -> ImageMasks:
        """All-instance masks of the image at ``image_url``: from the cache, else segmented once."""
        params = self.settings.inference_params()
        url_key = _url_key(image_url)
        if self.settings.remember_image_urls and (digest := self.store.cache.get(url_key)) is not None:
            entry = self.store.peek(cache_key(digest.decode(), self.segmenter.identity, params))
            if entry is not None:
                metrics.CACHE_LOOKUPS.labels(result="hit").inc()
                return ImageMasks(image_url, digest.decode(), entry[0])
        if not self.segmenter.loaded and not self.segmenter.weights_available():
            raise ModelUnavailable(self.segmenter_missing_message())  # before downloading anything
        image = self.images.load(image_url)
        if self.settings.remember_image_urls:
            self.store.cache.put(url_key, image.digest.encode())

        def compute() -> tuple[MaskSet, dict]:
            started = time.perf_counter()
            masks = self.segmenter.segment(image.pixels)
            elapsed = time.perf_counter() - started
            metrics.SEGMENT_SECONDS.observe(elapsed)
            log.info("segmented %dx%d image: %d instances in %.0f ms",
                     image.size[1], image.size[0], len(masks), 1000 * elapsed)
            return masks, {}

        masks, _, hit = self.store.get_or_compute(cache_key(image.digest, self.segmenter.identity, params), compute)
        metrics.CACHE_LOOKUPS.labels(result="hit" if hit else "miss").inc()
        return ImageMasks(image_url, image.digest, masks, image)

    def crop_embeddings(self, found: ImageMasks) -> np.ndarray:
        """``(N, D)`` CLIP embeddings of the masks' crops, cached beside the masks."""
        clip = self._require_clip()
        model_id = f"{self.segmenter.identity}|{clip.identity}"
        key = cache_key(found.digest, model_id, self.settings.inference_params())

        def compute() -> tuple[MaskSet, dict]:
            image = found.image or self.images.load(found.url)
            found.image = image
            return MaskSet.empty(found.masks.image_size), {"clip": clip.embed_masks(image.pixels, found.masks)}

        _, extras, _ = self.store.get_or_compute(key, compute)
        return extras["clip"]

    def _require_clip(self) -> ClipScorer:
        if self.clip is None or not self.settings.clip_enabled:
            raise ModelUnavailable("CLIP is disabled (CLIP_ENABLED=false): text prompts and zero-shot labels need it")
        self.clip.load()
        return self.clip

    def phrase_embeddings(self, phrases: tuple[str, ...]) -> np.ndarray:
        """Text embeddings, memoised per process (labels repeat on every task)."""
        with self._lock:
            found = self._phrases.get(phrases)
        if found is None:
            found = self._require_clip().embed_texts(list(phrases))
            with self._lock:
                self._phrases[phrases] = found
        return found

    # ------------------------------------------------------------ selection
    def _answer_prompts(self, found: ImageMasks, prompts: Prompts, config: LabelConfig,
                        options: ProjectOptions, task_id: Any) -> list[dict[str, Any]]:
        brush = config.brush
        assert brush is not None  # checked by predict
        if not prompts:
            return []
        masks = found.masks
        h, w = masks.image_size
        points = np.array([p.in_pixels(w, h) for p in prompts.points], dtype=np.int64).reshape(-1, 2)
        positive = np.array([p.positive for p in prompts.points], dtype=bool)
        selections: list[Selection | None] = []
        label = brush.match_label(prompts.label)
        if prompts.texts:
            text = " ".join(t.text for t in prompts.texts)
            selections.append(self._select_text(found, text, prompts, points, positive, options))
            label = label_named_in(text, brush.labels) or label
        elif prompts.boxes:
            for box in prompts.boxes:
                selections.append(select_by_box(masks, box.in_pixels(w, h), points, positive,
                                                rule=options.point_rule, morphology=options.morphology))
        elif len(points):
            selections.append(select_by_points(masks, points, positive, rule=options.point_rule,
                                               morphology=options.morphology))
        label = label or options.default_label or (brush.labels[0] if brush.labels else None)
        chosen = [s for s in selections if s is not None]
        if len(chosen) < len(selections):
            log.info("task %s: %d of %d prompts matched no mask (%d instances on the image; a click on "
                     "background or an object the model did not find)", task_id,
                     len(selections) - len(chosen), len(selections), len(masks))
        return [brush_region(brush, s.mask, label, s.score, s.box) for s in chosen]

    def _select_text(self, found: ImageMasks, text: str, prompts: Prompts, points: np.ndarray,
                     positive: np.ndarray, options: ProjectOptions) -> Selection | None:
        masks = found.masks
        if len(masks) == 0:
            return None
        embeddings = self.crop_embeddings(found).astype(np.float32)
        sims = embeddings @ self.phrase_embeddings((text,))[0]
        sims[~embeddings.any(axis=1)] = -np.inf  # too small to score
        candidates = np.ones(len(masks), dtype=bool)
        h, w = masks.image_size
        for box in prompts.boxes:  # text with a box: masks whose box lies mostly inside it
            x0, y0, x1, y1 = box.in_pixels(w, h)
            candidates &= masks.box_intersections((x0, y0, x1, y1)) >= 0.5 * masks.areas
        for (x, y), pos in zip(points, positive):  # text with clicks: masks under the clicks
            covers = masks.contains(int(x), int(y))
            candidates &= covers if pos else ~covers
        picked = select_by_text(sims, candidates, several=names_several(text), margin=options.text_margin)
        if not picked:
            return None
        union = masks[picked].union()
        return Selection(union, float(np.mean(masks.scores[picked])), tuple(picked), masks.union_box(picked))

    def _pre_annotate(self, found: ImageMasks, config: LabelConfig, options: ProjectOptions) -> list[dict]:
        """Prompt-less pre-annotation: every instance worth keeping, labelled, highest score first."""
        masks = found.masks
        h, w = masks.image_size
        keep = (masks.areas >= options.preannotate_min_area * h * w) & (masks.scores >= options.preannotate_min_score)
        order = [int(i) for i in np.argsort(-masks.scores, kind="stable") if keep[i]]
        order = order[: options.preannotate_max_instances]
        targets = config.pre_annotation_targets()
        labels_per_tag = {tag.from_name: self._instance_labels(found, order, tag, options) for tag in targets}
        result: list[dict[str, Any]] = []
        for rank, i in enumerate(order):
            mask = masks.mask(i)
            for tag in targets:
                label = labels_per_tag[tag.from_name][rank]
                if label is not False:  # False: CLIP could not place it and there is no default label
                    result.extend(regions_for(tag, mask, label, float(masks.scores[i]), masks.union_box([i])))
        return result

    def _instance_labels(self, found: ImageMasks, order: list[int], tag: Any,
                         options: ProjectOptions) -> list[str | bool | None]:
        """Per kept instance its label; False = drop the instance."""
        first = tag.labels[0] if tag.labels else None
        mode = options.label_mode
        if mode is LabelMode.CLIP and tag.labels and order and not self._clip_usable():
            mode = LabelMode.FIRST
        if mode is LabelMode.NONE:
            return [None] * len(order)
        if mode is LabelMode.FIRST or not tag.labels or not order:
            return [first] * len(order)
        phrases = LabelPhrases.of(tag)
        embeddings = self.crop_embeddings(found)[order]
        labels, sims = zero_shot(embeddings, self.phrase_embeddings(phrases.phrases), phrases.owner,
                                 len(phrases.labels))
        placed = embeddings.any(axis=1) & (sims >= options.label_min_similarity)
        fallback = options.default_label or False
        return [phrases.labels[int(lab)] if ok else fallback for lab, ok in zip(labels, placed)]

    def _clip_usable(self) -> bool:
        """CLIP for zero-shot labels; without it pre-annotation still works (first label), said once."""
        try:
            self._require_clip()
            return True
        except ModelUnavailable as exc:
            if not self._clip_warned:
                self._clip_warned = True
                log.warning("pre-annotation labels fall back to each tag's first label: %s", exc.message)
            return False


def _task_name(task: Any, index: int) -> str:
    return f"tasks[{index}] (id {task.get('id') if isinstance(task, dict) else None})"


def _url_key(url: str) -> str:
    return "url:v1:" + hashlib.sha256(url.encode()).hexdigest()


def project_id(project: str | None) -> str:
    """LS sends ``"<id>.<timestamp>"``; the id is what stays the same."""
    return (project or "").split(".", 1)[0]


def task_image_url(task: Any, config: LabelConfig, index: int) -> str:
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise BadRequest(f"tasks[{index}].data must be an object")
    url = task["data"].get(config.image_key)
    if not isinstance(url, str) or not url.strip():
        raise BadRequest(f"tasks[{index}].data.{config.image_key} must be the image URL "
                         f"(the <Image value=\"${config.image_key}\"> of the label config)")
    return url


def build_service(settings: Settings) -> FastSAMService:
    """Wire the stages from settings. Models load on first use; the weight files are digested
    here (``model_version``), so the first /health, which LS waits 1 s for, does not hash them."""
    service = FastSAMService(
        settings=settings,
        segmenter=Segmenter(SegmenterConfig.from_settings(settings)),
        store=MaskStore(make_cache(settings)),
        images=ImageLoader(ImageSourceConfig.from_settings(settings)),
        clip=ClipScorer(ClipConfig.from_settings(settings)) if settings.clip_enabled else None,
    )
    log.info("model version %s", service.model_version)
    return service
