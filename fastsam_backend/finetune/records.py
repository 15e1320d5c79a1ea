"""Fine-tuning decisions, per project: what a train job decided, kept where every replica reads it.

A record holds both figures, both checkpoints' sha256 digests and the time, as JSON in Redis
(``<CACHE_PREFIX>finetune:v1:<project>``, plus the last 50 of every project in
``<CACHE_PREFIX>finetune:v1:log``); only an adopted one carries the checkpoint's path, which is
the project's registration (``tuned.py`` loads it; ``jobs/train.py`` writes it).
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fastsam_backend.finetune.training import Decision, segmenter_for

if TYPE_CHECKING:
    from fastsam_backend.settings import Settings

LOG_KEEP = 50


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


def tuned_segmenter_for(settings: Settings, record: FineTuneRecord | None) -> Any:
    """A ``Segmenter`` on the project's adopted checkpoint (None without one, or when its file is gone)."""
    if record is None or record.checkpoint is None or not Path(record.checkpoint).is_file():
        return None
    return segmenter_for(record.checkpoint, imgsz=settings.imgsz, conf=settings.conf, iou=settings.iou,
                         device=settings.device)
