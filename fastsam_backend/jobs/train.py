"""The ``train`` job: fine-tune FastSAM on one project's accepted masks, adopt it only if it helps.

``train_project(project_id)`` (RQ queue ``<QUEUE_PREFIX>train``, JSON arguments) runs on a worker:

1. gathers the project's accepted masks from Label Studio (``LABEL_STUDIO_URL``/``_API_KEY``): the
   brush and polygon regions of every non-cancelled annotation (rectangles are no masks), with the
   task's image loaded through the backend's own ``ImageLoader``;
2. splits tasks train/held-out by a digest of the task id (``finetune.training.split``: deterministic, a
   task stays on its side as more are annotated);
3. trains (``finetune.training.train``: ``FINETUNE_EPOCHS`` at ``FINETUNE_IMGSZ`` on ``FINETUNE_DEVICE``);
4. evaluates base and tuned on the held-out tasks with the service's inference settings, decides
   (``FINETUNE_MARGIN``, ``FINETUNE_MIN_HELDOUT``);
5. records the decision -- both figures, both checkpoints' sha256 digests, the time -- as JSON in
   Redis (``finetune/records.py``: ``<CACHE_PREFIX>finetune:v1:<project>``, plus the last 50 of every project in
   ``<CACHE_PREFIX>finetune:v1:log``); only an adopted one carries the checkpoint's path, which is
   the project's registration. The checkpoint is written under ``MODEL_DIR/finetuned/<project>/``:
   replicas and workers must share ``MODEL_DIR`` to load it.

Off by default: ``FINETUNE_ENABLED=false`` refuses every train job, and a project trains only when
someone asks (``fastsam-backend train --project ID``).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastsam_backend.finetune.records import FineTuneRecord, records_for
from fastsam_backend.finetune.training import Sample, decide, evaluate, split, train
from fastsam_backend.images.cloud import ImageRef
from fastsam_backend.jobs.queues import JobKind, JobQueues, JobRefused

if TYPE_CHECKING:
    from fastsam_backend.ls.project import ProjectClient
    from fastsam_backend.service.orchestrator import FastSAMService

log = logging.getLogger(__name__)

TRAIN_FUNC = "fastsam_backend.jobs.train.train_project"
TRAIN_TIMEOUT_S = 6 * 3600  # a training job's RQ timeout (the warm/pre-annotate JOB_TIMEOUT_S is for seconds)


def gather(service: FastSAMService, client: ProjectClient) -> tuple[list[Sample], list[str]]:
    """The project's accepted masks, one ``Sample`` per annotated task (its latest accepted
    annotation), and each task's key for the split."""
    from fastsam_backend.ls.annotations import parse_regions
    from fastsam_backend.ls.labelconfig import parse_label_config

    image_key = parse_label_config(client.label_config()).image_key
    samples, keys = [], []
    for task in client.tasks():
        url = task.data.get(image_key)
        if not task.annotations or not isinstance(url, str):
            continue
        regions = [r for r in parse_regions(task.annotations[-1], f"task {task.id}") if not r.is_box]
        if not regions:
            continue
        image = service.images.load(ImageRef(url, task.id)).pixels
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
    from fastsam_backend.models.segmenter import resolve_weights

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
    from fastsam_backend.jobs.functions import process_service
    from fastsam_backend.jobs.preannotate_project import project_client

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
