"""Image download and decode ahead of the job that needs them, in a worker process.

A worker runs its jobs one after the other: fetch, decode, the everything pass, cache write. On a
GPU (or with images far away) the network pass leaves the CPU and the network idle, so the worker
takes its next job before the current one runs (``worker.py``) and this loader fetches and decodes
that job's image in a background thread meanwhile; the job's own ``load`` then takes the result.

Bounded: ``depth`` images are held at most (the current job's and the next one's: 2; a 12 MP image is
~36 MB decoded), the oldest dropped.
A prefetch that failed is not trusted: the job loads again itself, so a transient error seen ahead
of time costs one more attempt, never the job.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fastsam_backend.images.cloud import ImageRef, ImageSource

if TYPE_CHECKING:
    from fastsam_backend.images.loader import ImageLoader, LoadedImage

log = logging.getLogger(__name__)


class PrefetchingLoader:
    """An ``ImageLoader`` whose ``prefetch(url)`` starts ``load(url)`` in a background thread."""

    def __init__(self, loader: ImageLoader, depth: int = 2) -> None:
        self.loader, self.depth = loader, max(1, depth)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastsam-prefetch")
        self._ahead: OrderedDict[ImageRef, Future[LoadedImage]] = OrderedDict()
        self._lock = threading.Lock()
        self.taken = 0  # loads answered from a prefetch (for the worker's log and the tests)

    def prefetch(self, source: ImageSource) -> None:
        ref = ImageRef.of(source)  # keyed by URL and task id
        with self._lock:
            if ref in self._ahead:
                return
            while len(self._ahead) >= self.depth:
                self._ahead.popitem(last=False)[1].cancel()
            self._ahead[ref] = self._pool.submit(self.loader.load, ref)

    def load(self, source: ImageSource) -> LoadedImage:
        ref = ImageRef.of(source)
        with self._lock:
            ahead = self._ahead.pop(ref, None)
        if ahead is not None and not ahead.cancelled():
            try:
                image = ahead.result()
                self.taken += 1
                return image
            except Exception as exc:  # the job tries once more itself and reports its own error
                log.debug("prefetch of an image failed (%s); loading it again", type(exc).__name__)
        return self.loader.load(ref)

    def close(self) -> None:
        with self._lock:
            for future in self._ahead.values():
                future.cancel()
            self._ahead.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __getattr__(self, name: str) -> Any:  # fetch_bytes, set_fallback, config: the loader's own
        return getattr(self.loader, name)
