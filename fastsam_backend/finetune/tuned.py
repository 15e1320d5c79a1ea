"""Projects' adopted fine-tuned checkpoints, loaded on demand into a bounded LRU of Segmenters.

The registration is the project's decision record (``records.Records``, JSON in Redis, so
every replica and worker sees it); a lookup is memoised ``LOOKUP_TTL_S`` per project so requests
do not each ask Redis. A project with an adopted checkpoint is predicted with its own ``Segmenter``
(its identity names the checkpoint, so its cache keys are its own) and its ``model_version`` gains
``+ft<digest12>``. At most ``FINETUNE_MAX_LOADED`` tuned models stay loaded in a process; the least
recently used one is dropped (reloaded from disk when asked for again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastsam_backend.finetune.records import FineTuneRecord, Records, records_for, tuned_segmenter_for

if TYPE_CHECKING:
    from fastsam_backend.models.segmenter import Segmenter
    from fastsam_backend.settings import Settings

log = logging.getLogger(__name__)

LOOKUP_TTL_S = 10.0


@dataclass(frozen=True)
class Tuned:
    """A project's adopted checkpoint: its Segmenter and its ``model_version`` tag."""

    segmenter: Segmenter
    tag: str


class TunedModels:
    def __init__(self, settings: Settings, records: Records | None = None) -> None:
        self.settings = settings
        self._records = records
        self._lookups: dict[str, tuple[float, FineTuneRecord | None]] = {}
        self._loaded: OrderedDict[str, Segmenter] = OrderedDict()  # checkpoint path -> Segmenter
        self._lock = threading.Lock()

    @property
    def records(self) -> Records:
        if self._records is None:
            self._records = records_for(self.settings)
        return self._records

    def record(self, project: str) -> FineTuneRecord | None:
        now = time.monotonic()
        with self._lock:
            memo = self._lookups.get(project)
        if memo is not None and now - memo[0] < LOOKUP_TTL_S:
            return memo[1]
        try:
            found = self.records.get(project)
        except Exception as exc:  # Redis down: predict with the base model rather than fail
            log.warning("fine-tune record of project %s unavailable: %s", project, exc)
            found = memo[1] if memo else None
        with self._lock:
            self._lookups[project] = (now, found)
        return found

    def for_project(self, project: str | None) -> Tuned | None:
        """The project's tuned Segmenter (LRU), or None: not fine-tuned, rejected, or its file is gone."""
        if not self.settings.finetune_enabled or not project:
            return None
        record = self.record(project)
        if record is None or record.checkpoint is None or record.tag is None:
            return None
        path = record.checkpoint
        with self._lock:
            segmenter = self._loaded.get(path)
            if segmenter is not None:
                self._loaded.move_to_end(path)
                return Tuned(segmenter, record.tag)
        segmenter = tuned_segmenter_for(self.settings, record)
        if segmenter is None:
            log.warning("project %s: adopted checkpoint %s is not on this machine (share MODEL_DIR); "
                        "predicting with the base model", project, path)
            return None
        with self._lock:
            segmenter = self._loaded.setdefault(path, segmenter)
            self._loaded.move_to_end(path)
            while len(self._loaded) > self.settings.finetune_max_loaded:
                dropped, _ = self._loaded.popitem(last=False)
                log.info("dropped tuned model %s (FINETUNE_MAX_LOADED=%d)", dropped, self.settings.finetune_max_loaded)
        return Tuned(segmenter, record.tag)

    def loaded_paths(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def health(self, n: int = 10) -> dict[str, Any]:
        """The last ``n`` decisions (every project, from Redis) and the tuned models loaded here."""
        try:
            recent = [r.to_dict() for r in self.records.recent(n)]
            error = None
        except Exception as exc:  # /health must answer whatever Redis does
            recent, error = [], f"decisions unavailable: {type(exc).__name__}"
        body: dict[str, Any] = {"enabled": self.settings.finetune_enabled, "decisions": recent,
                                "loaded": self.loaded_paths()}
        if error:
            body["error"] = error
        return body
