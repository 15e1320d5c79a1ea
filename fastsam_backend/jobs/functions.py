"""The functions RQ runs (``warm_image``, ``preannotate_task``), on this process's one service.

Each takes JSON-able arguments and calls this process's one ``FastSAMService`` -- the object the
HTTP layer calls, built once per worker process (``worker.py``), so the models load once per
process and never per job:

- ``warm_image(url, task_id=None)``: the image's masks (and its CLIP crop embeddings when CLIP is configured)
  into the cache, through the same ``MaskStore``; a job whose masks did not reach the shared cache
  (its Redis away meanwhile) fails over to a retry. Its cross-process lock makes an interactive click
  on an image whose warm job is *running* wait for that work, and at run time an image that is
  cached already (under any URL: the key is the bytes' digest) costs a lookup. ``task_id`` is how a
  cloud storage URI is fetched (through Label Studio, per task); jobs queued as ``(url,)`` before
  it existed run as they did.
- ``preannotate_task(task_id, project_id, model_version)``: the task fetched from Label Studio,
  predicted as ``/predict`` predicts it, the prediction written back under that version
  (``preannotate_project.py``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastsam_backend.images.cloud import ImageRef
from fastsam_backend.jobs import batching
from fastsam_backend.jobs.queues import JobKind, JobRefused, count

if TYPE_CHECKING:
    from fastsam_backend.service.orchestrator import FastSAMService

_PROCESS: dict[str, Any] = {}


def install_service(service: FastSAMService) -> None:
    """The worker process's service (``worker.py`` builds and loads it before the first job)."""
    _PROCESS["service"] = service


def process_service() -> FastSAMService:
    """This process's service; built here once if no worker installed one (e.g. a plain ``rq worker``)."""
    service = _PROCESS.get("service")
    if service is None:
        from fastsam_backend.service.orchestrator import build_service
        from fastsam_backend.settings import load_settings

        service = _PROCESS["service"] = build_service(load_settings(batch_time_budget_s=0))
    return service


def count_outcome(service: FastSAMService, kind: JobKind, outcome: str) -> None:
    """Counts a job's outcome in the queues' stats hash (inside an RQ job; best effort)."""
    from rq import get_current_job

    job = get_current_job()
    if job is not None:
        count(job.connection, f"{service.settings.queue_prefix}jobs:stats", kind, outcome)


def warm_image(url: str, task_id: int | None = None) -> dict[str, Any]:
    """Masks (and CLIP crop embeddings, when CLIP can load) of the image at ``url`` (of task
    ``task_id``) into the cache (where a worker's batch put them already, a lookup; ``batching.py``)."""
    service = process_service()
    started = time.perf_counter()
    found = service.masks_for(ImageRef.of(url, task_id))
    embeddings = False
    if service.clip is not None and service.models.zero_shot_unavailable() is None:
        service.crop_embeddings(found)
        embeddings = True
    if not _in_shared_cache(service, found.key):
        # computed while the cache's Redis was away (the store fell back to this process): the work
        # reached no one else, so the job fails over to a retry instead of ending "done"
        raise NotCached("the shared cache did not take this image's masks (Redis unavailable?); retrying")
    outcome = "computed" if found.computed or batching.claim(found.key) else "cached"
    count_outcome(service, JobKind.WARM, outcome)
    return {"outcome": outcome, "digest": found.key.digest, "instances": len(found.masks),
            "embeddings": embeddings, "seconds": round(time.perf_counter() - started, 3)}


class NotCached(RuntimeError):
    """A warm job whose masks the shared cache does not hold after all (retried, unlike ``JobRefused``)."""


def _in_shared_cache(service: FastSAMService, key: Any) -> bool:
    """Whether the store's cache (Redis, or the embedded LRU) holds ``key``'s masks: not this
    process's memory tier, which is all a store has while its Redis is away."""
    from fastsam_backend.cache.store import cache_key

    cache = service.store.cache
    name = cache_key(key.digest, key.model_id, key.params)
    contains = getattr(cache, "contains", None)
    return bool(contains(name)) if contains is not None else cache.get(name) is not None


def preannotate_task(task_id: int, project_id: int, model_version: str) -> dict[str, Any]:
    """The task's prediction written to Label Studio (``LABEL_STUDIO_URL``/``_API_KEY`` of this worker)."""
    from fastsam_backend.jobs.preannotate_project import project_client, write_one

    service = process_service()
    # the settings must agree; the learned labels or a newly adopted checkpoint may have moved on
    # since the enqueue (their +tags), and the prediction is written under the job's version
    version = service.version_for(service.options_for(str(project_id)))
    if not model_version.startswith(version):
        raise JobRefused(f"this worker predicts as model_version {version}, the job asks for {model_version}: "
                         "run the workers with the enqueuer's settings (weights, IMGSZ, CONF, ...)")
    outcome = write_one(service, project_client(service.settings, project_id), task_id, model_version)
    count_outcome(service, JobKind.PREANNOTATE, outcome)
    return {"outcome": outcome, "task": task_id}
