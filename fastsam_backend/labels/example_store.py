"""Where each project's label examples live: Redis (shared, durable) or this process (embedded).

Keys, under ``CACHE_PREFIX`` (no TTL: under ``volatile-lru`` Redis never evicts them):

- ``learn:v1:<project>:ann:<annotation id>`` → a hash: ``meta`` (JSON ``{"labels": [...],
  "clip": <CLIP identity>, "task": <task id>}``) and ``emb`` (``codec.encode_arrays``, ``(K, D)``
  float16: row ``k`` is the example of ``labels[k]``), and since geometry version 1 ``geo``
  (``(K, G)`` float32 mask-geometry descriptors, ``meta["geometry"]`` their ``GEOMETRY_VERSION``).
  One per annotation, so an update replaces exactly its examples and a deletion removes exactly
  them. An entry without ``geo``, or of another geometry version, loads without geometry (its CLIP
  embeddings are used; the geometry model waits for enough examples that have it);
- ``learn:v1:<project>:anns`` → the set of annotation ids with examples;
- ``learn:v1:<project>:rev`` → a counter bumped on every change (``model_version`` and each
  process's prototypes follow it);
- ``learn:v1:<project>:gone:<annotation id>`` → a tombstone (``TOMBSTONE_TTL_S``) set when Label
  Studio deletes the annotation: learning runs in the background (``jobs/learn.py``), so a create or
  update still queued when the deletion arrives must not store its examples afterwards.

No pickle: JSON and the codec's checked array format only.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fastsam_backend.core.codec import CorruptEntry, decode_arrays, encode_arrays
from fastsam_backend.core.geometry import GEOMETRY_VERSION, N_FEATURES
from fastsam_backend.labels.label_model import Example

log = logging.getLogger(__name__)

TOMBSTONE_TTL_S = 7 * 24 * 3600  # longer than any learn job waits (its retries included)


@dataclass(frozen=True)
class AnnotationExamples:
    """The examples one annotation gave, all embedded with CLIP ``clip_id``."""

    annotation_id: str
    task_id: str | None
    clip_id: str
    examples: tuple[Example, ...]


class ExampleStore(Protocol):
    def put(self, project: str, item: AnnotationExamples) -> int: ...
    def bury(self, project: str, annotation_ids: list[str]) -> None: ...
    def delete(self, project: str, annotation_ids: list[str]) -> int: ...
    def revision(self, project: str) -> int: ...
    def load(self, project: str, clip_id: str) -> list[Example]: ...
    def count(self, project: str) -> int: ...


class MemoryExamples:
    """One process's examples (no ``REDIS_URL``): lost on restart, not shared."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, AnnotationExamples]] = {}
        self._rev: dict[str, int] = {}
        self._gone: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def put(self, project: str, item: AnnotationExamples) -> int:
        with self._lock:
            if item.annotation_id in self._gone.get(project, ()):
                log.info("project %s annotation %s was deleted: its examples are not stored", project,
                         item.annotation_id)
                return self._rev.get(project, 0)
            self._data.setdefault(project, {})[item.annotation_id] = item
            self._rev[project] = self._rev.get(project, 0) + 1
            return self._rev[project]

    def bury(self, project: str, annotation_ids: list[str]) -> None:
        """The annotations were deleted: a later ``put`` of theirs stores nothing."""
        with self._lock:
            self._gone.setdefault(project, set()).update(annotation_ids)

    def delete(self, project: str, annotation_ids: list[str]) -> int:
        with self._lock:
            gone = [a for a in annotation_ids if self._data.get(project, {}).pop(a, None) is not None]
            if gone:
                self._rev[project] = self._rev.get(project, 0) + 1
            return len(gone)

    def revision(self, project: str) -> int:
        with self._lock:
            return self._rev.get(project, 0)

    def load(self, project: str, clip_id: str) -> list[Example]:
        with self._lock:
            items = list(self._data.get(project, {}).values())
        return [ex for item in items if item.clip_id == clip_id for ex in item.examples]

    def count(self, project: str) -> int:
        with self._lock:
            return len(self._data.get(project, {}))


class RedisExamples:
    """Examples in Redis, shared by every replica and worker; survives restarts."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    def _key(self, project: str, rest: str) -> str:
        return f"{self.prefix}learn:v1:{project}:{rest}"

    def put(self, project: str, item: AnnotationExamples) -> int:
        import redis

        meta = {"labels": [ex.label for ex in item.examples], "clip": item.clip_id, "task": item.task_id}
        emb = np.stack([ex.embedding for ex in item.examples]).astype(np.float16) if item.examples \
            else np.zeros((0, 0), np.float16)
        fields = {"emb": encode_arrays({"emb": emb})}
        if item.examples and all(ex.geometry is not None for ex in item.examples):
            meta["geometry"] = GEOMETRY_VERSION
            fields["geo"] = encode_arrays({"geo": np.stack([ex.geometry for ex in item.examples]).astype(np.float32)})
        key, gone = self._key(project, f"ann:{item.annotation_id}"), self._key(project, f"gone:{item.annotation_id}")
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(gone)  # a deletion between this check and EXEC aborts the transaction
                if not pipe.exists(gone):
                    pipe.multi()
                    pipe.delete(key)
                    pipe.hset(key, mapping={"meta": json.dumps(meta), **fields})
                    pipe.sadd(self._key(project, "anns"), item.annotation_id)
                    pipe.incr(self._key(project, "rev"))
                    return int(pipe.execute()[-1])
            except redis.WatchError:
                pass
        log.info("project %s annotation %s was deleted: its examples are not stored", project, item.annotation_id)
        return self.revision(project)

    def bury(self, project: str, annotation_ids: list[str]) -> None:
        """The annotations were deleted: a later ``put`` of theirs stores nothing (for TOMBSTONE_TTL_S)."""
        if annotation_ids:
            pipe = self.client.pipeline(transaction=False)
            for a in annotation_ids:
                pipe.set(self._key(project, f"gone:{a}"), 1, ex=TOMBSTONE_TTL_S)
            pipe.execute()

    def delete(self, project: str, annotation_ids: list[str]) -> int:
        if not annotation_ids:
            return 0
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(*(self._key(project, f"ann:{a}") for a in annotation_ids))
        pipe.srem(self._key(project, "anns"), *annotation_ids)
        gone = int(pipe.execute()[0])
        if gone:
            self.client.incr(self._key(project, "rev"))
        return gone

    def revision(self, project: str) -> int:
        value = self.client.get(self._key(project, "rev"))
        return int(value) if value is not None else 0

    def count(self, project: str) -> int:
        return int(self.client.scard(self._key(project, "anns")))

    def load(self, project: str, clip_id: str) -> list[Example]:
        ids = sorted(a.decode() if isinstance(a, bytes) else str(a)
                     for a in self.client.smembers(self._key(project, "anns")))
        pipe = self.client.pipeline(transaction=False)
        for a in ids:
            pipe.hmget(self._key(project, f"ann:{a}"), ["meta", "emb", "geo"])
        out: list[Example] = []
        for a, (meta, emb, geo) in zip(ids, pipe.execute()):
            if meta is None or emb is None:
                continue  # deleted between the two reads
            try:
                info = json.loads(meta)
                arr = decode_arrays(emb)["emb"]
                labels = info["labels"]
                if arr.shape[0] != len(labels):
                    raise CorruptEntry(f"{len(labels)} labels for {arr.shape[0]} embeddings")
            except (ValueError, KeyError, TypeError, CorruptEntry) as exc:
                log.warning("project %s annotation %s: unreadable examples skipped (%s)", project, a, exc)
                continue
            if info.get("clip") == clip_id:
                geometry = _geometry(geo, info, len(labels), project, a)
                out += [Example(str(lab), arr[k].astype(np.float32), None if geometry is None else geometry[k])
                        for k, lab in enumerate(labels)]
        return out

    def clear(self, project: str) -> None:
        """Every key of the project (tests, and a project's reset)."""
        keys = list(self.client.scan_iter(match=self._key(project, "*"), count=500))
        if keys:
            self.client.delete(*keys)


def _geometry(blob: bytes | None, info: dict, n: int, project: str, annotation: str) -> np.ndarray | None:
    """The entry's ``(K, G)`` geometry when it is of this version, else None (older entries, or a
    layout this code does not know: their examples count without geometry)."""
    if blob is None or info.get("geometry") != GEOMETRY_VERSION:
        return None
    try:
        geo = decode_arrays(blob)["geo"]
    except (KeyError, ValueError, CorruptEntry) as exc:
        log.warning("project %s annotation %s: unreadable geometry ignored (%s)", project, annotation, exc)
        return None
    return geo.astype(np.float32) if geo.shape == (n, N_FEATURES) else None


def store_errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises (Redis down, timeouts): the webhook answers 503 on these."""
    try:
        import redis
    except ImportError:  # pragma: no cover - redis is a dependency
        return (OSError,)
    return (redis.RedisError, OSError)


def make_example_store(redis_url: str | None, prefix: str) -> ExampleStore:
    if not redis_url:
        return MemoryExamples()
    import redis

    return RedisExamples(redis.Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=5.0), prefix)
