"""The ``train`` job: fine-tune FastSAM on one project's accepted masks, adopt it only if it helps.

``train_project(project_id)`` (RQ queue ``<QUEUE_PREFIX>train``, JSON arguments) runs on a worker:

1. gathers the project's accepted masks from Label Studio (``LABEL_STUDIO_URL``/``_API_KEY``): the
   brush and polygon regions of every non-cancelled annotation (rectangles are no masks), with the
   task's image loaded through the backend's own ``ImageLoader``;
2. splits tasks train/held-out by a digest of the task id (``finetune.split``: deterministic, a
   task stays on its side as more are annotated);
3. trains (``finetune.train``: ``FINETUNE_EPOCHS`` at ``FINETUNE_IMGSZ`` on ``FINETUNE_DEVICE``);
4. evaluates base and tuned on the held-out tasks with the service's inference settings, decides
   (``FINETUNE_MARGIN``, ``FINETUNE_MIN_HELDOUT``);
5. records the decision -- both figures, both checkpoints' sha256 digests, the time -- as JSON in
   Redis (``<CACHE_PREFIX>finetune:v1:<project>``, plus the last 50 of every project in
   ``<CACHE_PREFIX>finetune:v1:log``); only an adopted one carries the checkpoint's path, which is
   the project's registration. The checkpoint is written under ``MODEL_DIR/finetuned/<project>/``:
   replicas and workers must share ``MODEL_DIR`` to load it.

Off by default: ``FINETUNE_ENABLED=false`` refuses every train job, and a project trains only when
someone asks (``fastsam-backend train --project ID``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .finetune import Decision, Sample, decide, evaluate, segmenter_for, split, train
from .jobs import JobKind, JobQueues, JobRefused

if TYPE_CHECKING:
    from .lsproject import ProjectClient
    from .service import FastSAMService
    from .settings import Settings

log = logging.getLogger(__name__)

TRAIN_FUNC = "fastsam_backend.finetune_job.train_project"
LOG_KEEP = 50
TRAIN_TIMEOUT_S = 6 * 3600  # a training job's RQ timeout (the warm/pre-annotate JOB_TIMEOUT_S is for seconds)


@dataclass(frozen=True)
class FineTuneRecord:
    """What a train job decided, as stored in Redis and shown in ``/health``."""

    project: str
    decision: Decision
    base_sha256: str
    tuned_sha256: str
    checkpoint: str | None  # the adopted checkpoint's path; None when rejected
    train_tasks: int
    heldout_tasks: int
    seconds: float
    at: float  # unix time of the decision

    @property
    def tag(self) -> str | None:
        """The ``model_version`` suffix of an adopted checkpoint: ``ft<digest12>``."""
        return f"ft{self.tuned_sha256[:12]}" if self.checkpoint else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decision": self.decision.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FineTuneRecord:
        return cls(str(d["project"]), Decision.from_dict(d["decision"]), str(d["base_sha256"]),
                   str(d["tuned_sha256"]), d.get("checkpoint"), int(d["train_tasks"]), int(d["heldout_tasks"]),
                   float(d["seconds"]), float(d["at"]))


class Records:
    """Decisions in Redis (``redis_url``) or, without one, in this process (tests, one-process use)."""

    _memory: ClassVar[dict[str, str]] = {}
    _lock = threading.Lock()

    def __init__(self, redis_url: str | None, prefix: str) -> None:
        self.prefix = f"{prefix}finetune:v1:"
        self._client = None
        if redis_url:
            import redis

            self._client = redis.Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=5.0)

    def put(self, record: FineTuneRecord) -> None:
        text = json.dumps(record.to_dict(), sort_keys=True)
        if self._client is None:
            with self._lock:
                self._memory[record.project] = text
            return
        with self._client.pipeline() as pipe:
            pipe.set(self.prefix + record.project, text)
            pipe.lpush(self.prefix + "log", text)
            pipe.ltrim(self.prefix + "log", 0, LOG_KEEP - 1)
            pipe.execute()

    def get(self, project: str) -> FineTuneRecord | None:
        if self._client is None:
            text = self._memory.get(project)
        else:
            raw = self._client.get(self.prefix + project)
            text = raw.decode() if raw is not None else None
        return FineTuneRecord.from_dict(json.loads(text)) if text else None

    def recent(self, n: int = 10) -> list[FineTuneRecord]:
        if self._client is None:
            texts = list(self._memory.values())[-n:]
        else:
            texts = [raw.decode() for raw in self._client.lrange(self.prefix + "log", 0, n - 1)]
        return [FineTuneRecord.from_dict(json.loads(t)) for t in texts]

    def clear(self, project: str) -> None:
        if self._client is None:
            self._memory.pop(project, None)
        else:
            self._client.delete(self.prefix + project)


def records_for(settings: Settings) -> Records:
    return Records(settings.redis_url, settings.cache_prefix)


def gather(service: FastSAMService, client: ProjectClient) -> tuple[list[Sample], list[str]]:
    """The project's accepted masks, one ``Sample`` per annotated task (its latest accepted
    annotation), and each task's key for the split."""
    from .annotations import parse_regions
    from .labelconfig import parse_label_config

    image_key = parse_label_config(client.label_config()).image_key
    samples, keys = [], []
    for task in client.tasks():
        url = task.data.get(image_key)
        if not task.annotations or not isinstance(url, str):
            continue
        regions = [r for r in parse_regions(task.annotations[-1], f"task {task.id}") if not r.is_box]
        if not regions:
            continue
        image = service.images.load(url).pixels
        masks = tuple(r.mask for r in regions if r.mask.shape == image.shape[:2])
        if masks:
            samples.append(Sample(image, masks))
            keys.append(str(task.id))
    return samples, keys


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_training(service: FastSAMService, project: str, samples: list[Sample], keys: list[str]) -> FineTuneRecord:
    """Split, train, evaluate both on the held-out tasks, decide, record (the job's work, testable
    without Label Studio)."""
    from .segmenter import resolve_weights

    s = service.settings
    base = resolve_weights(s.fastsam_weights, Path(s.model_dir))
    if base is None:
        raise JobRefused(f"the base checkpoint {s.fastsam_weights} is not on this worker")
    train_set, held = split(samples, keys)
    if not train_set or not held:
        raise JobRefused(f"project {project}: {len(samples)} annotated tasks with masks; need some to train on "
                         "and some held out")
    started = time.time()
    device = s.finetune_device if s.finetune_device != "auto" else ("0" if _cuda() else "cpu")
    out_dir = Path(s.model_dir) / "finetuned" / project
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        tuned_tmp = train(base, train_set, work, epochs=s.finetune_epochs, imgsz=s.finetune_imgsz, device=device)
        tuned = out_dir / tuned_tmp.name
        tuned_tmp.replace(tuned)
    kw = {"imgsz": s.imgsz, "conf": s.conf, "iou": s.iou, "device": "cpu" if device == "cpu" else s.device}
    base_figures, tuned_figures = evaluate(base, held, **kw), evaluate(tuned, held, **kw)
    decision = decide(base_figures, tuned_figures, tuned_figures.n_masks, min_heldout=s.finetune_min_heldout,
                      margin=s.finetune_margin)
    tuned_digest = _sha256(tuned)
    if not decision.adopt:
        tuned.unlink(missing_ok=True)  # a rejected checkpoint is not kept (its digest is recorded)
    record = FineTuneRecord(project, decision, _sha256(base), tuned_digest, str(tuned) if decision.adopt else None,
                            len(train_set), len(held), round(time.time() - started, 1), time.time())
    records_for(s).put(record)
    log.info("fine-tune project %s: %s (%s)", project, "adopted" if decision.adopt else "rejected", decision.reason)
    return record


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def train_project(project_id: int) -> dict[str, Any]:
    """The RQ job: gather, train, decide, record. Refused (never retried) when fine-tuning is off."""
    from .jobs import process_service
    from .preannotate import project_client

    service = process_service()
    if not service.settings.finetune_enabled:
        raise JobRefused("fine-tuning is off: set FINETUNE_ENABLED=true on the workers")
    samples, keys = gather(service, project_client(service.settings, project_id))
    return run_training(service, str(project_id), samples, keys).to_dict()


def enqueue_train(queues: JobQueues, project_id: int) -> tuple[str, bool]:
    """One train job per project at a time; returns (job id, whether it is new)."""
    job_id = f"{queues.config.prefix}train-{int(project_id)}"
    new = queues.enqueue(JobKind.TRAIN, TRAIN_FUNC, [int(project_id)], job_id, f"fine-tune project {project_id}",
                         timeout_s=TRAIN_TIMEOUT_S)
    return job_id, new


def tuned_segmenter_for(settings: Settings, record: FineTuneRecord | None) -> Any:
    """A ``Segmenter`` on the project's adopted checkpoint (None without one, or when its file is gone)."""
    if record is None or record.checkpoint is None or not Path(record.checkpoint).is_file():
        return None
    return segmenter_for(record.checkpoint, imgsz=settings.imgsz, conf=settings.conf, iou=settings.iou,
                         device=settings.device)
