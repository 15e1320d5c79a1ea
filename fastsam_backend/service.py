"""The backend's work, HTTP-free: tasks + context → one LS prediction per task.

request → prompts → cached masks → selection → LS regions. Built once per worker
process by ``build_service`` and shared by all requests (thread-safe: the segmenter
serialises inference, the store single-flights cold images).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics
from .cache import MaskStore, cache_key, make_cache
from .errors import BadRequest, ModelUnavailable
from .images import ImageLoader, ImageSourceConfig, LoadedImage
from .labelconfig import LabelConfig, OutputTag, parse_label_config
from .masks import MaskSet
from .prompts import Prompts, parse_context
from .results import brush_region, regions_for
from .segmenter import Segmenter, SegmenterConfig, missing_weights_message
from .selection import Selection, select_by_box, select_by_points
from .settings import PointRule, Settings

log = logging.getLogger(__name__)


@dataclass
class ProjectOptions:
    """Per-project overrides sent through /setup's ``extra_params``."""

    point_rule: PointRule
    morphology: bool
    extra: dict[str, Any] = field(default_factory=dict)
    label_config: str | None = None  # /setup's schema, used when /predict omits label_config


class FastSAMService:
    """One per worker process; see ``build_service``."""

    def __init__(self, settings: Settings, segmenter: Segmenter, store: MaskStore, images: ImageLoader) -> None:
        self.settings = settings
        self.segmenter = segmenter
        self.store = store
        self.images = images
        self._projects: dict[str, ProjectOptions] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- setup
    @property
    def model_version(self) -> str:
        """Checkpoint identity and every parameter that changes outputs (LS re-predicts when it changes)."""
        s = self.settings
        return (
            f"{self.segmenter.identity}-i{s.imgsz}-c{s.conf:g}-u{s.iou:g}-d{s.max_det}"
            f"-{s.point_rule.value}{'-m' if s.morphology else ''}"
        )

    def setup(self, project: str | None, hostname: str | None = None, access_token: str | None = None,
              extra_params: Any = None, schema: str | None = None) -> str:
        """Remember LS's host/token as image-download fallback and the project's overrides; no model load."""
        self.images.set_fallback(hostname, access_token)
        if extra_params is not None and not isinstance(extra_params, dict):
            raise BadRequest("extra_params must be an object or null")
        options = self._options(extra_params or {})
        options.label_config = schema
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

    def _options(self, extra: dict[str, Any]) -> ProjectOptions:
        try:
            rule = PointRule(extra.get("point_rule", self.settings.point_rule))
        except ValueError as exc:
            raise BadRequest(f"extra_params.point_rule must be one of {[r.value for r in PointRule]}") from exc
        morph = extra.get("morphology", self.settings.morphology)
        if not isinstance(morph, bool):
            raise BadRequest("extra_params.morphology must be true or false")
        return ProjectOptions(rule, morph, extra)

    def options_for(self, project: str | None) -> ProjectOptions:
        with self._lock:
            found = self._projects.get(project_id(project)) if project else None
        return found or ProjectOptions(self.settings.point_rule, self.settings.morphology)

    # --------------------------------------------------------------- predict
    def predict(self, tasks: list[dict[str, Any]], context: Any, label_config: str,
                project: str | None = None) -> list[dict[str, Any]]:
        """One prediction per task: ``{"result": [...], "score": float, "model_version": str}``."""
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("tasks must be a non-empty list")
        options = self.options_for(project)
        config = parse_label_config(label_config or options.label_config)
        prompts = parse_context(context)
        interactive = context is not None
        if interactive and config.brush is None:
            raise BadRequest("label_config has no BrushLabels tag bound to the image: nowhere to put masks")
        predictions = []
        for i, task in enumerate(tasks):
            image_url = task_image_url(task, config, i)
            masks = self.masks_for(image_url)
            if interactive:
                result = self._answer_prompts(masks, prompts, config, options, task.get("id"))
            else:
                result = self._everything(masks, config)
            scores = [r["score"] for r in result if "score" in r]
            predictions.append({
                "result": result,
                "score": float(np.mean(scores)) if scores else 0.0,
                "model_version": self.model_version,
            })
        return predictions

    def masks_for(self, image_url: str) -> MaskSet:
        """All-instance masks of the image at ``image_url``: from the cache, else segmented once."""
        params = self.settings.inference_params()
        url_key = _url_key(image_url)
        if self.settings.remember_image_urls:
            digest = self.store.cache.get(url_key)
            if digest is not None:
                entry = self.store.peek(cache_key(digest.decode(), self.segmenter.identity, params))
                if entry is not None:
                    metrics.CACHE_LOOKUPS.labels(result="hit").inc()
                    return entry[0]
        if not self.segmenter.loaded and not self.segmenter.weights_available():
            raise ModelUnavailable(self.segmenter_missing_message())  # before downloading anything
        image: LoadedImage = self.images.load(image_url)
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

        masks, _extras, hit = self.store.get_or_compute(
            cache_key(image.digest, self.segmenter.identity, params), compute)
        metrics.CACHE_LOOKUPS.labels(result="hit" if hit else "miss").inc()
        return masks

    # ------------------------------------------------------------ selection
    def _answer_prompts(self, masks: MaskSet, prompts: Prompts, config: LabelConfig,
                        options: ProjectOptions, task_id: Any) -> list[dict[str, Any]]:
        brush = config.brush
        assert brush is not None  # checked by predict
        if not prompts:
            return []
        h, w = masks.image_size
        points = np.array([p.in_pixels(w, h) for p in prompts.points], dtype=np.int64).reshape(-1, 2)
        positive = np.array([p.positive for p in prompts.points], dtype=bool)
        selections: list[Selection | None] = []
        if prompts.boxes:
            for box in prompts.boxes:
                selections.append(select_by_box(masks, box.in_pixels(w, h), points, positive,
                                                rule=options.point_rule, morphology=options.morphology))
        elif len(points):
            selections.append(select_by_points(masks, points, positive, rule=options.point_rule,
                                               morphology=options.morphology))
        label = brush.match_label(prompts.label) or (brush.labels[0] if brush.labels else None)
        found = [s for s in selections if s is not None]
        if len(found) < len(selections):
            log.info("task %s: %d of %d prompts matched no mask (%d instances on the image; a click on "
                     "background or an object the model did not find)", task_id,
                     len(selections) - len(found), len(selections), len(masks))
        return [brush_region(brush, s.mask, label, s.score) for s in found]

    def _everything(self, masks: MaskSet, config: LabelConfig) -> list[dict[str, Any]]:
        """Prompt-less pre-annotation: every instance, largest score first."""
        targets = config.pre_annotation_targets()
        order = np.argsort(-masks.scores, kind="stable")
        result: list[dict[str, Any]] = []
        for i in order:
            mask = masks.mask(int(i))
            for tag in targets:
                label = tag.labels[0] if tag.labels else None
                result.extend(regions_for(tag, mask, label, float(masks.scores[i])))
        return result


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
    """Wire the stages from settings; nothing heavy happens here (the model loads on first use)."""
    return FastSAMService(
        settings=settings,
        segmenter=Segmenter(SegmenterConfig.from_settings(settings)),
        store=MaskStore(make_cache(settings)),
        images=ImageLoader(ImageSourceConfig.from_settings(settings)),
    )


__all__ = ["FastSAMService", "OutputTag", "build_service"]
