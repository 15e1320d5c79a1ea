"""Warm jobs in batches: one forward pass for the images of several jobs, where the device gains.

On a GPU the everything pass of one image leaves most of the device idle; several images in one
pass cost little more than one. A worker on a GPU therefore takes up to ``WORKER_BATCH`` warm jobs
at once (``worker.py``, the jobs it takes ahead) and, before the first of them runs, ``warm_batch``
loads their images (fetched ahead by the prefetch thread), segments the ones not cached yet in one
pass per image shape (``Segmenter.segment_batch``) and writes each into the cache through the
store, under its single flight. Each job then runs as before and finds its masks cached -- the
content key makes it a lookup -- and reports the image as computed (``claim``).

Nothing here is needed for correctness: an image that fails to load, or a batch that fails, is
left to its own job, which tries again and reports its own error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastsam_backend import metrics
from fastsam_backend.cache.store import ImageKey, cache_key
from fastsam_backend.images.cloud import ImageSource

if TYPE_CHECKING:
    from fastsam_backend.service.orchestrator import ColdImage, FastSAMService

log = logging.getLogger(__name__)

GPU_BATCH = 8  # WORKER_BATCH=0 on a GPU: FastSAM-s at 1024 in fp32 stays far below any GPU's memory


@dataclass
class BatchReport:
    """What one ``warm_batch`` did; seconds per stage (the GPU report splits a job this way)."""

    images: int = 0
    computed: int = 0
    cached: int = 0
    failed: int = 0
    passes: int = 0  # forward passes run (one per image shape and batch)
    seconds: dict[str, float] = field(default_factory=lambda: {"load": 0.0, "network": 0.0, "write": 0.0})


class _Claims:
    """Keys a batch computed in this process, until their own job reports them (bounded)."""

    def __init__(self, limit: int = 256) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock, self._limit = threading.Lock(), limit

    def add(self, key: ImageKey) -> None:
        with self._lock:
            self._keys[_name(key)] = None
            while len(self._keys) > self._limit:
                self._keys.popitem(last=False)

    def pop(self, key: ImageKey) -> bool:
        with self._lock:
            if (name := _name(key)) not in self._keys:
                return False
            del self._keys[name]
            return True


def _name(key: ImageKey) -> str:
    return cache_key(key.digest, key.model_id, key.params)


_CLAIMS = _Claims()


def claim(key: ImageKey) -> bool:
    """True once for an image a batch of this process segmented (its job counts it as computed)."""
    return _CLAIMS.pop(key)


def warm_batch(service: FastSAMService, urls: list[ImageSource], max_batch: int) -> BatchReport:
    """Masks of the images at ``urls`` into the cache, ``max_batch`` images per forward pass at most;
    nothing when the first (the job about to run) is cached already.

    CLIP crop embeddings follow per image when the job would compute them (CLIP configured and
    loadable), while the decoded image is still at hand."""
    report = BatchReport(images=len(urls))
    seg = service.segmenter
    todo: dict[tuple[int, ...], list[ColdImage]] = {}
    seen: set[str] = set()
    started = time.perf_counter()
    for i, url in enumerate(urls):
        if service.image_key_if_cached(url) is not None:  # a key lookup: nothing to download
            report.cached += 1
            if i == 0:
                # the current job's image came with an earlier batch: the next batch starts at the
                # first job whose image is not cached, so that batches stay full (not one new image each)
                return report
            continue
        try:
            cold = service.load_cold(url)
        except Exception as exc:  # its job reports it (and retries it as its own kind of error)
            log.debug("batch: image not loaded (%s); left to its job", type(exc).__name__)
            report.failed += 1
            continue
        if service.store.has_masks(cold.key):
            report.cached += 1
        elif _name(cold.key) not in seen:  # the same bytes under two URLs are segmented once
            seen.add(_name(cold.key))
            todo.setdefault(cold.image.pixels.shape, []).append(cold)
    report.seconds["load"] = time.perf_counter() - started
    embed = service.clip is not None and service.models.zero_shot_unavailable() is None
    for group in todo.values():
        for i in range(0, len(group), max(1, max_batch)):
            chunk = group[i : i + max(1, max_batch)]
            started = time.perf_counter()
            try:
                found = seg.segment_batch([cold.image.pixels for cold in chunk])
            except Exception as exc:  # e.g. out of GPU memory: each job segments its own image
                log.warning("batch of %d images failed (%s: %s); each job segments its own",
                            len(chunk), type(exc).__name__, exc)
                report.failed += len(chunk)
                continue
            elapsed = time.perf_counter() - started
            report.seconds["network"] += elapsed
            report.passes += 1
            metrics.SEGMENT_SECONDS.observe(elapsed / len(chunk))
            started = time.perf_counter()
            for cold, masks in zip(chunk, found):
                stored = service.store_cold(cold, lambda masks=masks: masks)
                if stored.computed:
                    report.computed += 1
                    _CLAIMS.add(cold.key)
                if embed:
                    service.crop_embeddings(stored)
            report.seconds["write"] += time.perf_counter() - started
    log.info("batch of %d images: %d segmented in %d passes, %d cached, %d left to their jobs", report.images,
             report.computed, report.passes, report.cached, report.failed)
    return report
