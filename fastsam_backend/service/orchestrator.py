"""The backend's work, HTTP-free: tasks + context → one LS prediction per task.

request → prompts → cached masks → selection → LS regions. Built once per worker
process by ``build_service`` and shared by all requests (thread-safe: the models
serialise inference, the store single-flights cold images).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastsam_backend import metrics
from fastsam_backend.cache.backends import make_cache
from fastsam_backend.cache.store import ImageKey, MaskStore
from fastsam_backend.core.masks import MaskSet
from fastsam_backend.errors import BackendError, BadRequest, DeadlineExceeded, ModelUnavailable
from fastsam_backend.finetune.tuned import Tuned, TunedModels
from fastsam_backend.images.cloud import ImageRef, ImageSource
from fastsam_backend.images.loader import ImageLoader, ImageSourceConfig, LoadedImage
from fastsam_backend.labels.example_store import ExampleStore, MemoryExamples, make_example_store
from fastsam_backend.labels.label_model import LabelModel
from fastsam_backend.ls.annotations import ANNOTATION_EVENTS, parse_event
from fastsam_backend.ls.answers import answer_tags
from fastsam_backend.ls.credentials import REFUSED_TOKEN_REASON, CredentialChecker
from fastsam_backend.ls.labelconfig import LabelConfig, parse_label_config
from fastsam_backend.ls.prompts import Prompts, parse_context
from fastsam_backend.ls.protocol import PredictRequest, SetupRequest, Task
from fastsam_backend.models.clip import ClipConfig, ClipScorer
from fastsam_backend.models.readiness import Models
from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig
from fastsam_backend.service.deadline import Deadline
from fastsam_backend.service.failures import RecentFailures
from fastsam_backend.service.interactive import answer_prompts
from fastsam_backend.service.learning import LearnConfig, Learner
from fastsam_backend.service.options import ProjectOptions
from fastsam_backend.service.prelabel import preannotate_image
from fastsam_backend.settings import InteractiveOutput, LabelMode, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColdImage:
    """A task image fetched and decoded for segmenting, and the cache key its masks go under."""

    ref: ImageRef
    image: LoadedImage
    key: ImageKey

    @property
    def url(self) -> str:
        return self.ref.url


@dataclass
class ImageMasks:
    """The cached masks of one task image, and the image itself once it had to be fetched."""

    ref: ImageRef  # the URL and the task id (a cloud image is fetched again through its task)
    key: ImageKey
    masks: MaskSet
    image: LoadedImage | None = None
    deadline: Deadline | None = None  # the request's, checked before each forward pass
    computed: bool = False  # this call segmented the image (a miss everywhere); the warm jobs count it

    @property
    def url(self) -> str:
        return self.ref.url


class FastSAMService:
    """One per worker process; see ``build_service``."""

    def __init__(self, settings: Settings, segmenter: Segmenter, store: MaskStore, images: ImageLoader,
                 clip: ClipScorer | None = None, examples: ExampleStore | None = None) -> None:
        self.settings = settings
        self.segmenter = segmenter
        self.store = store
        self.images = images
        self.clip = clip
        self._defaults = ProjectOptions.defaults(settings)
        self._projects: dict[str, ProjectOptions] = {}
        self._lock = threading.Lock()
        self._phrases: dict[tuple[str, ...], np.ndarray] = {}
        self._cold = threading.BoundedSemaphore(settings.max_cold_images)  # decoded images + activations
        self.models = Models(segmenter, clip if settings.clip_enabled else None, settings.load_wait_s)
        self.credentials = CredentialChecker(verify_ssl=settings.verify_ssl)
        self.learner = Learner(self, examples or MemoryExamples(), LearnConfig(  # labels from annotations
            settings.learn_enabled, settings.learn_min_examples, settings.learn_match_iou,
            settings.learn_min_similarity, refresh_s=settings.learn_refresh_s,
            significance=settings.learn_significance))
        self.tuned = TunedModels(settings)  # projects' adopted fine-tuned checkpoints (finetune/tuned.py)
        self.failures = RecentFailures()  # the last /predict failures, for /health

    # ----------------------------------------------------------------- setup
    @property
    def model_version(self) -> str:
        """``model_version`` of a project without overrides (see ``version_for``)."""
        return self.version_for(self._defaults)

    def version_for(self, options: ProjectOptions, learned: LabelModel | None = None,
                    tuned: Tuned | None = None) -> str:
        """What LS compares to skip tasks already predicted: the checkpoint identities, every setting
        and project override that changes outputs -- never whether a model happened to load (a
        component that cannot load fails the predictions needing it, under this same version)."""
        s = self.settings
        version = (f"{self.segmenter.identity}-i{s.imgsz}-c{s.conf:g}-u{s.iou:g}-d{s.max_det}"
                   f"-{options.point_rule.value}{'-m' if options.morphology else ''}")
        # issue #15: the box rule, and polygons (keyholes since then) with their tolerance and cap
        version += f"-b{options.box_rule.value}-{options.polygon_style.tag()}"
        if options.interactive_output is not InteractiveOutput.AUTO:
            version += f"-o{options.interactive_output.value}"
        if self.clip is not None and options.label_mode is LabelMode.CLIP:
            version += f"+{self.clip.identity}"  # zero-shot labels depend on it
        if (digest := options.overrides_digest(self._defaults)) is not None:
            version += f"-p{digest}"
        if learned is not None and (tag := learned.version_tag) is not None:
            version += f"+{tag}"  # the project's learned labels (changes with its annotations)
        return version + (f"+{tuned.tag}" if tuned is not None else "")  # its adopted fine-tuned checkpoint

    def project_version(self, project: str | None) -> str:
        """The whole ``model_version`` a project's predictions carry now: its options, and its learned
        labels and adopted checkpoint when it has them (what /setup, predict and preannotate use)."""
        pid = project_id(project)
        if not pid:
            return self.version_for(self._defaults)
        return self.version_for(self.options_for(pid), self.learner.model_for(pid), self.tuned.for_project(pid))

    def setup(self, request: SetupRequest) -> str:
        """Remember LS's host/token as image-download fallback and the project's overrides; no model load.

        With ``LABEL_STUDIO_URL`` set, asks it once (cached) whether it accepts the token images are
        downloaded with; a refusal is a 422 naming the fix, which LS shows on "Validate and Save".
        """
        self.images.set_fallback(request.hostname, request.access_token)
        key = self.settings.label_studio_api_key
        token = key.get_secret_value() if key else request.access_token
        if self.settings.label_studio_url and token:
            check = self.credentials.check(self.settings.label_studio_url, token)
            if check.accepted is False:
                raise BadRequest(check.message, status=422, reason=REFUSED_TOKEN_REASON)
        options = self._defaults.with_overrides(request.extra_params, request.schema)
        if request.project is not None and (project := project_id(str(request.project))):
            with self._lock:
                self._projects[project] = options
            return self.project_version(project)
        return self.version_for(options)

    def fit(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Annotation events teach the project's labels (``learning``), in this call (``model.py``'s ``fit``;
        the ``/webhook`` route learns in the background instead, ``jobs/learn.py``); FastSAM itself is not trained."""
        if event in ANNOTATION_EVENTS:
            why = self.learner.unavailable()
            return {"learned": False, "reason": why} if why else self.learner.learn(parse_event(event, data))
        log.info("webhook %s acknowledged (FastSAM is zero-shot: no training)", event)
        return {"trained": False, "reason": "FastSAM is used zero-shot; annotations do not change it"}

    def segmenter_missing_message(self) -> str:
        return self.segmenter.missing_message()

    def options_for(self, project: str | None) -> ProjectOptions:
        with self._lock:
            found = self._projects.get(project_id(project)) if project else None
        return found or self._defaults

    # --------------------------------------------------------------- predict
    def predict(self, request: PredictRequest) -> list[dict[str, Any]]:
        """One prediction per task: ``{"result": [...], "score": float, "model_version": str}``.

        A batch of several tasks (pre-annotation) never loses the predictions it made. A task
        whose image cannot be had gets ``{"error": "tasks[i] (id …): …"}`` in its place; once
        ``BATCH_TIME_BUDGET_S`` is spent (Label Studio gives up on /predict after 100 s and would
        drop the whole batch), the tasks not yet started get such an entry too. Label Studio logs
        those entries, stores no prediction for them, and sends them again on its next run (it
        skips the tasks that have a prediction of this model version). A single task or an
        interactive request is answered with the error (4xx; its reason phrase, which Label Studio
        logs and shows, names a cloud image's fix). A batch where every task fails is answered
        with the entries too: Label Studio logs a non-2xx answer's status line only, but each
        entry whole. Every failure is kept for ``/health`` (``failures``).
        """
        tasks = request.tasks
        deadline = Deadline(self.settings.predict_deadline_s)
        options = self.options_for(request.project_id)
        learned = self.learner.model_for(project_id(request.project_id))
        tuned = self.tuned.for_project(project_id(request.project_id))
        config = parse_label_config(request.label_config or options.label_config)
        interactive = request.context is not None
        prompts = parse_context(request.context, config.exemplar_tools(options.exemplar_tags))
        if interactive:
            answer_tags(config, options.interactive_output)  # a config with nowhere to put masks: 400 first
        if interactive or len(tasks) == 1:
            self.models.wait_until_loaded()
            answers = []
            for i, task in enumerate(tasks):
                try:
                    answers.append(self._predict_task(task, i, config, prompts if interactive else None, options,
                                                      deadline, learned, tuned))
                except BackendError as exc:
                    self.failures.add(task.id, f"{_task_name(task, i)}: {exc.message}", exc.status)
                    raise
            return answers

        self.models.wait_until_loaded()  # the budget is for per-task work, not for a load after start-up
        budget = self.settings.batch_time_budget_s
        predictions: list[dict[str, Any]] = []
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
                predictions.append(self._predict_task(task, i, config, None, options, deadline, learned, tuned))
                metrics.BATCH_TASKS.labels(outcome="predicted").inc()
            except BackendError as exc:  # the image, the task's data, a model a label needs
                log.warning("batch of %d tasks: %s skipped: %s", len(tasks), _task_name(task, i), exc.message)
                metrics.BATCH_TASKS.labels(outcome="failed").inc()
                predictions.append({"error": f"{_task_name(task, i)}: {exc.message}"})
                self.failures.add(task.id, predictions[-1]["error"], exc.status)
            slowest = max(slowest, time.monotonic() - task_started)
        if all("error" in p for p in predictions):
            log.warning("batch of %d tasks: every task failed; the first: %s", len(tasks), predictions[0]["error"])
        return predictions

    def _predict_task(self, task: Task, index: int, config: LabelConfig, prompts: Prompts | None,
                      options: ProjectOptions, deadline: Deadline, learned: LabelModel | None = None,
                      tuned: Tuned | None = None) -> dict[str, Any]:
        """``prompts`` None: pre-annotation (no context); ``learned``: the project's learned labels."""
        found = self.masks_for(task_image(task, config, index), deadline, tuned.segmenter if tuned else None)
        if prompts is not None:
            result = answer_prompts(self, found, prompts, config, options, task.id, learned)
        else:
            result = preannotate_image(self, found, config, options, learned)
        scores = [r["score"] for r in result if "score" in r]
        return {"result": result, "score": float(np.mean(scores)) if scores else 0.0,
                "model_version": self.version_for(options, learned, tuned)}

    def masks_for(self, image: ImageSource, deadline: Deadline | None = None,
                  segmenter: Segmenter | None = None) -> ImageMasks:
        """All-instance masks of ``image`` (a URL, or an ``ImageRef`` with the task id a cloud URI
        needs): from the cache, else segmented once.

        At most ``MAX_COLD_IMAGES`` images are fetched, decoded and segmented at once in this
        process (a burst of cold 12 MP images queues instead of exhausting memory); ``deadline``
        is checked while waiting for a slot and before the forward pass.
        """
        deadline, seg = deadline or Deadline(0), segmenter or self.segmenter  # a project's tuned one, or the base
        model_id, params = seg.identity, self.settings.inference_params()
        ref = ImageRef.of(image)
        remember = self.settings.remember_image_urls
        if remember and (digest := self.store.digest_for_url(self.images.memo_key(ref))) is not None:
            key = ImageKey(digest, model_id, params)
            if (masks := self.store.peek_masks(key)) is not None:
                metrics.CACHE_LOOKUPS.labels(result="hit").inc()
                return ImageMasks(ref, key, masks, deadline=deadline)
        self._require_segmenter(seg)  # before downloading anything
        left = deadline.left()
        if not self._cold.acquire(timeout=left if left is not None else -1):
            raise DeadlineExceeded(f"the request's deadline (PREDICT_DEADLINE_S={deadline.seconds:g} s) was spent "
                                   f"waiting for one of the MAX_COLD_IMAGES={self.settings.max_cold_images} "
                                   "slots (other cold images are being segmented)")
        try:
            return self._segment_cold(ref, deadline, model_id, params, seg)
        finally:
            self._cold.release()

    @staticmethod
    def _require_segmenter(seg: Segmenter) -> None:
        """A 503 now, before any image is fetched, when FastSAM is not loaded and cannot be: its
        weights are missing, or its last load failed (a corrupt checkpoint; ``load`` retries it at
        most every ``RETRY_AFTER_S`` and raises the remembered reason in between)."""
        if seg.loaded:
            return
        if not seg.weights_available():
            raise ModelUnavailable(seg.missing_message())
        if seg.error is not None:
            seg.load()

    def _segment_cold(self, ref: ImageRef, deadline: Deadline, model_id: str, params: dict,
                      segmenter: Segmenter) -> ImageMasks:
        cold = self.load_cold(ref, segmenter)
        deadline.check("segmenting the image (it took that long to fetch and decode)")

        def compute() -> MaskSet:
            started = time.perf_counter()
            masks = segmenter.segment(cold.image.pixels)
            elapsed = time.perf_counter() - started
            metrics.SEGMENT_SECONDS.observe(elapsed)
            log.info("segmented %dx%d image: %d instances in %.0f ms",
                     cold.image.size[1], cold.image.size[0], len(masks), 1000 * elapsed)
            return masks

        found = self.store_cold(cold, compute)
        found.deadline = deadline
        return found

    def load_cold(self, source: ImageSource, segmenter: Segmenter | None = None) -> ColdImage:
        """The cold path's first half, shared with batched warm jobs (``jobs/batching.py``): the
        image fetched and decoded, its URL remembered (``ImageLoader.memo_key``), and its cache key."""
        seg, ref = segmenter or self.segmenter, ImageRef.of(source)
        image = self.images.load(ref)
        if self.settings.remember_image_urls:
            self.store.remember_url(self.images.memo_key(ref), image.digest)
        return ColdImage(ref, image, ImageKey(image.digest, seg.identity, self.settings.inference_params()))

    def store_cold(self, cold: ColdImage, compute: Callable[[], MaskSet]) -> ImageMasks:
        """The cold path's second half: ``compute``'s masks into the cache under the image's key,
        once across threads and processes (the store's single flight; a hit computes nothing)."""
        masks, hit = self.store.masks(cold.key, compute)
        metrics.CACHE_LOOKUPS.labels(result="hit" if hit else "miss").inc()
        return ImageMasks(cold.ref, cold.key, masks, cold.image, computed=not hit)

    def image_key_if_cached(self, image: ImageSource) -> ImageKey | None:
        """The image's key when its URL is remembered and its masks are in the cache; downloads and
        decodes nothing (a key lookup), so enqueuers can skip what is warm already."""
        if not self.settings.remember_image_urls:
            return None
        if (digest := self.store.digest_for_url(self.images.memo_key(ImageRef.of(image)))) is None:
            return None
        key = ImageKey(digest, self.segmenter.identity, self.settings.inference_params())
        return key if self.store.has_masks(key) else None

    def crop_embeddings(self, found: ImageMasks, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``(N, D)`` CLIP embeddings of the masks' crops, aligned with ``found.masks``' rows and
        cached beside the masks; all-zero rows never win (masks of ``CLIP_MIN_MASK_AREA`` pixels
        or fewer, and rows not asked for).

        ``rows`` (indices) asks for those rows only -- what a caller can answer from -- and embeds
        only the ones the cache does not hold yet; None asks for every row. Callers read the rows
        they asked for; other rows hold whatever earlier callers asked for, or zero.
        """
        clip = self.models.require_clip()
        n = len(found.masks)
        wanted = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)

        def compute(missing: np.ndarray) -> np.ndarray:
            if found.deadline is not None:
                found.deadline.check("embedding the masks' crops with CLIP")
            found.image = found.image or self.images.load(found.ref)
            return clip.embed_masks(found.image.pixels, found.masks[missing])

        return self.store.embeddings(found.key, clip.identity, n, wanted, compute).vectors

    def phrase_embeddings(self, phrases: tuple[str, ...]) -> np.ndarray:
        """Text embeddings, memoised per process (labels repeat on every task)."""
        with self._lock:
            found = self._phrases.get(phrases)
        if found is None:
            found = self.models.require_clip().embed_texts(list(phrases))
            with self._lock:
                self._phrases[phrases] = found
        return found

def _task_name(task: Task, index: int) -> str:
    return f"tasks[{index}] (id {task.id})"


def project_id(project: str | None) -> str:
    """LS sends ``"<id>.<timestamp>"``; the id is what stays the same."""
    return (project or "").split(".", 1)[0]


def task_image_url(task: Task, config: LabelConfig, index: int) -> str:
    url = task.data.get(config.image_key)
    if not isinstance(url, str) or not url.strip():
        raise BadRequest(f"tasks[{index}].data.{config.image_key} must be the image URL "
                         f"(the <Image value=\"${config.image_key}\"> of the label config)")
    return url


def task_image(task: Task, config: LabelConfig, index: int) -> ImageRef:
    """The task's image URL with the task's id (Label Studio serves cloud storage per task)."""
    return ImageRef.of(task_image_url(task, config, index), task.id)


def build_service(settings: Settings, segmenter: Segmenter | None = None) -> FastSAMService:
    """Wire the stages from settings (tests may pass their own segmenter). Models load on first
    use; the weight files are digested here (``model_version``), so the first /health, which LS
    waits 1 s for, does not hash them."""
    service = FastSAMService(
        settings=settings,
        segmenter=segmenter or Segmenter(SegmenterConfig.from_settings(settings)),
        store=MaskStore(make_cache(settings), url_memo_ttl_s=settings.url_memo_ttl_s),
        images=ImageLoader(ImageSourceConfig.from_settings(settings)),
        clip=ClipScorer(ClipConfig.from_settings(settings)) if settings.clip_enabled else None,
        examples=make_example_store(settings.redis_url, settings.cache_prefix),
    )
    log.info("model version %s", service.model_version)
    return service
