"""What each kind of job is enqueued with: its id, its function's dotted path, its arguments.

Job ids come from what the enqueuer knows (the URL and the model identity; the task and the
``model_version``), so the same work enqueued twice runs once (``JobQueues.enqueue``). The
function paths are stored in Redis with every job: a path that changes must stay importable
until queues drain (``fastsam_backend.jobs`` resolves the paths of earlier releases).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastsam_backend.errors import BadRequest
from fastsam_backend.images.cloud import ImageRef, ImageSource
from fastsam_backend.jobs.queues import JobKind, JobQueues, QueueConfig

if TYPE_CHECKING:
    from fastsam_backend.service.orchestrator import FastSAMService

WARM_FUNC = "fastsam_backend.jobs.functions.warm_image"
PREANNOTATE_FUNC = "fastsam_backend.jobs.functions.preannotate_task"


def _digest(*parts: Any) -> str:
    canon = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def model_key(service: FastSAMService) -> list[Any]:
    """What a warm job's result depends on besides the image: the checkpoint, the inference
    parameters and, when configured, CLIP (its crop embeddings are warmed too)."""
    clip = service.clip.identity if service.clip is not None else None
    return [service.segmenter.identity, service.settings.inference_params(), clip]


def warm_job_id(config: QueueConfig, url: str, model: list[Any]) -> str:
    return f"{config.prefix}warm-{_digest(url, model)[:32]}"


def preannotate_job_id(config: QueueConfig, ls_url: str, task_id: int, model_version: str) -> str:
    return f"{config.prefix}pre-{task_id}-{_digest(ls_url.rstrip('/'), task_id, model_version)[:16]}"


@dataclass
class Enqueued:
    """What an enqueue call did; ``job_ids`` are every job the caller may follow (new or already there)."""

    enqueued: int = 0
    duplicate: int = 0  # the same job was queued, scheduled or running already
    cached: int = 0  # warm: the image is in the cache already, no job
    job_ids: list[str] = field(default_factory=list)

    def add(self, other: Enqueued) -> None:
        self.enqueued += other.enqueued
        self.duplicate += other.duplicate
        self.cached += other.cached
        self.job_ids += other.job_ids


def enqueue_warm(queues: JobQueues, service: FastSAMService, images: list[ImageSource]) -> Enqueued:
    """Warm jobs for ``images`` (URLs, or ``ImageRef``s with their task ids: a cloud URI needs it),
    skipping images whose masks are cached already (a key lookup each)."""
    report, model = Enqueued(), model_key(service)
    for image in images:
        ref = ImageRef.of(image)
        if service.image_key_if_cached(ref) is not None:
            report.cached += 1
            continue
        job_id = warm_job_id(queues.config, service.images.memo_key(ref), model)
        args: list[Any] = [ref.url] if ref.task_id is None else [ref.url, ref.task_id]  # (url,) as before
        # the description is what RQ shows and logs: never the URL, whose query may be a signature
        new = queues.enqueue(JobKind.WARM, WARM_FUNC, args, job_id, f"warm image {job_id[-12:]}")
        report.enqueued += new
        report.duplicate += not new
        report.job_ids.append(job_id)
    return report


def enqueue_preannotate(queues: JobQueues, ls_url: str, project_id: int, task_ids: list[int],
                        model_version: str) -> Enqueued:
    report = Enqueued()
    for task_id in task_ids:
        job_id = preannotate_job_id(queues.config, ls_url, task_id, model_version)
        new = queues.enqueue(JobKind.PREANNOTATE, PREANNOTATE_FUNC, [task_id, project_id, model_version], job_id,
                             f"pre-annotate task {task_id}")
        report.enqueued += new
        report.duplicate += not new
        report.job_ids.append(job_id)
    return report


def warm_new_tasks(queues: JobQueues, service: FastSAMService, body: dict[str, Any]) -> dict[str, Any]:
    """Label Studio's ``TASKS_CREATED`` webhook: a warm job for each new task's image.

    The payload is ``{"action": "TASKS_CREATED", "tasks": [{"id", "data", ...}], "project": {"id",
    "label_config", ...}}``; the image is ``data[<key>]`` of the label config's ``<Image value="$key">``
    (the project's, else the one ``/setup`` saw, else ``image``).
    """
    from fastsam_backend.ls.labelconfig import parse_label_config

    project = body.get("project") if isinstance(body.get("project"), dict) else {}
    label_config = project.get("label_config") or service.options_for(str(project.get("id") or "")).label_config
    try:
        image_key = parse_label_config(label_config).image_key if label_config else "image"
    except BadRequest:
        image_key = "image"
    tasks = body.get("tasks") if isinstance(body.get("tasks"), list) else []
    urls = [ImageRef.of(url, t.get("id")) for t in tasks if isinstance(t, dict) and isinstance(t.get("data"), dict)
            and isinstance(url := t["data"].get(image_key), str) and url.strip()]
    report = enqueue_warm(queues, service, urls)
    return {"tasks": len(tasks), "enqueued": report.enqueued, "duplicate": report.duplicate, "cached": report.cached,
            "without_image": len(tasks) - len(urls)}
