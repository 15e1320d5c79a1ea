"""``MaskStore``: every key and every kind of cache entry, over a byte cache, with single-flight.

Four kinds of entry, each behind a small typed method:

- ``url:v1:<sha256(url)>`` → the image's content digest (a click on a cached image downloads
  nothing; LS upload/local-files URLs never change content);
- ``masks:v<schema>:<model>:<params digest>:<image digest>`` → the image's ``MaskSet``;
- ``emb:v<schema>:<model>:<params digest>:<image digest>`` → ``(N, D)`` CLIP crop embeddings
  of those masks and the ``(N,)`` rows it holds (``model`` names the segmenter, CLIP and the
  entry version ``EMBEDDINGS_VERSION``). Rows are embedded when first asked for (pre-annotation
  asks for the instances it keeps, a text prompt for its candidates), merged into the entry; a
  row not held is zero and is embedded by the next caller that asks for it;
- ``arr:v<schema>:<model>:<params digest>:<image digest>`` → named per-instance arrays computed
  from the masks (and image) by a named, versioned recipe (``model`` names the segmenter and the
  recipe), e.g. the exemplar cues (geometry and colour statistics).

Reads go, in order: a small in-process LRU of decoded entries, the byte cache, or ``compute()``
-- run once per key across threads of this process (single-flight) and, with Redis, at most
once at a time across processes (best-effort ``SET NX PX`` lock; other processes poll for the
result). Entries that do not decode (foreign, truncated, corrupt) are recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

import numpy as np

from fastsam_backend.cache.backends import LockingCache, MaskCache
from fastsam_backend.core.codec import (
    SCHEMA_VERSION,
    CorruptEntry,
    decode_arrays,
    decode_maskset,
    encode_arrays,
    encode_maskset,
)
from fastsam_backend.core.masks import MaskSet

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class EntryKind(Generic[T]):
    """How one kind of entry is named and turned into bytes and back (no pickle anywhere)."""

    prefix: str
    encode: Callable[[T], bytes]
    decode: Callable[[bytes], T]  # raises CorruptEntry


@dataclass(frozen=True)
class Embeddings:
    """An image's cached crop embeddings: ``vectors`` ``(N, D)`` aligned with its ``MaskSet``'s
    rows, ``held`` ``(N,)`` bool the rows embedded so far (a held row may be zero: a mask too
    small to score); rows not held are zero."""

    vectors: np.ndarray
    held: np.ndarray

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.held.shape != (self.vectors.shape[0],):
            raise CorruptEntry(f"embeddings {self.vectors.shape} and held rows {self.held.shape} disagree")


def _encode_embeddings(emb: Embeddings) -> bytes:
    return encode_arrays({"clip": emb.vectors, "held": np.asarray(emb.held, dtype=bool)})


def _decode_embeddings(data: bytes) -> Embeddings:
    arrays = decode_arrays(data)
    if set(arrays) != {"clip", "held"} or arrays["held"].dtype != np.bool_:
        raise CorruptEntry(f"expected arrays 'clip' and bool 'held', got {sorted(arrays)}")
    return Embeddings(arrays["clip"], arrays["held"])


MASKS: EntryKind[MaskSet] = EntryKind("masks", encode_maskset, decode_maskset)
EMBEDDINGS: EntryKind[Embeddings] = EntryKind("emb", _encode_embeddings, _decode_embeddings)
EMBEDDINGS_VERSION = 2  # 2: the entry says which rows it holds (1 held every row)
NAMED_ARRAYS: EntryKind[dict[str, np.ndarray]] = EntryKind("arr", encode_arrays, decode_arrays)


def cache_key(image_digest: str, model_id: str, params: Mapping[str, object], kind: str = MASKS.prefix) -> str:
    """Stable key for one kind of entry of one image under one model and inference parameters.

    Includes the codec schema version, so a format change never reads old entries.
    ``params`` is canonicalized (sorted keys, enums by value) and hashed with ``model_id``.
    """
    canon = json.dumps(
        [model_id, {str(k): params[k] for k in sorted(params, key=str)}],
        sort_keys=True, separators=(",", ":"), default=_json_default,
    )  # fmt: skip
    digest = hashlib.sha256(canon.encode()).hexdigest()[:16]
    model = re.sub(r"[^A-Za-z0-9._-]", "_", model_id.rsplit("/", 1)[-1])[:48]
    return f"{kind}:v{SCHEMA_VERSION}:{model}:{digest}:{image_digest}"


def url_key(url: str) -> str:
    return "url:v1:" + hashlib.sha256(url.encode()).hexdigest()


def _json_default(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


@dataclass(frozen=True)
class ImageKey:
    """What an image's entries are keyed by: its bytes, the model, the inference parameters."""

    digest: str  # SHA-256 of the image bytes
    model_id: str
    params: Mapping[str, object]


class UrlMemo:
    """A bounded, short-lived in-process memo of URL -> content digest, in front of the cache's
    ``url:`` entries (the one Redis round trip a warm click had left).

    Entries live ``ttl_s`` seconds (0 = off) and at most ``entries`` are kept (least recently
    set dropped first). What it can serve stale is what the cache's ``url:`` entry serves stale
    already (a URL whose content changed keeps its old digest until that entry expires); the memo
    only adds: a ``url:`` entry deleted or rewritten in Redis is seen by this process up to
    ``ttl_s`` later. Masks are keyed by content, so replicas never disagree on what a digest means.
    """

    def __init__(self, ttl_s: float, entries: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.entries, self._clock = ttl_s, entries, clock
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._mu = threading.Lock()

    def get(self, url: str) -> str | None:
        if self.ttl_s <= 0:
            return None
        with self._mu:
            item = self._items.get(url)
            if item is None:
                return None
            if item[1] <= self._clock():
                del self._items[url]
                return None
            return item[0]

    def put(self, url: str, digest: str) -> None:
        if self.ttl_s <= 0 or self.entries <= 0:
            return
        with self._mu:
            self._items[url] = (digest, self._clock() + self.ttl_s)
            self._items.move_to_end(url)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)


class MaskStore:
    """Decoded-entry LRU + byte cache + single-flight computation.

    Returned values are shared between callers: treat them as read-only (decoded arrays are
    marked read-only).
    """

    def __init__(self, cache: MaskCache, *, memory_entries: int = 8, lock_ttl_s: float = 60.0,
                 lock_wait_s: float = 60.0, poll_s: tuple[float, float] = (0.02, 0.25),
                 url_memo_ttl_s: float = 0.0, url_memo_entries: int = 4096):  # fmt: skip
        self.cache = cache
        self._urls = UrlMemo(url_memo_ttl_s, url_memo_entries)
        self.memory_entries, self.lock_ttl_s, self.lock_wait_s, self.poll_s = (
            memory_entries, lock_ttl_s, lock_wait_s, poll_s)  # fmt: skip
        self._locking = cache if isinstance(cache, LockingCache) else None
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._corrupt_seen: set[str] = set()
        self._mu = threading.Lock()
        self._counts = {"memory_hits": 0, "cache_hits": 0, "computes": 0, "coalesced": 0, "corrupt": 0,
                        "lock_waits": 0}  # fmt: skip

    # ------------------------------------------------------------- typed entries
    def digest_for_url(self, url: str) -> str | None:
        """The content digest last seen at ``url``, if remembered: from the in-process URL memo
        (no Redis round trip on a warm click), else from the cache (then memoized)."""
        if (digest := self._urls.get(url)) is not None:
            return digest
        value = self.cache.get(url_key(url))
        try:
            digest = value.decode("ascii") if value is not None and re.fullmatch(rb"[0-9a-f]{64}", value) else None
        except UnicodeDecodeError:
            return None
        if digest is not None:
            self._urls.put(url, digest)
        return digest

    def remember_url(self, url: str, digest: str) -> None:
        self.cache.put(url_key(url), digest.encode("ascii"))
        self._urls.put(url, digest)

    def peek_masks(self, image: ImageKey) -> MaskSet | None:
        """The image's masks if they are in memory or in the cache; never computes."""
        return self.peek(cache_key(image.digest, image.model_id, image.params), MASKS)

    def has_masks(self, image: ImageKey) -> bool:
        """Whether the image's masks are cached (a key lookup: nothing is transferred or decoded)."""
        key = cache_key(image.digest, image.model_id, image.params)
        with self._mu:
            if key in self._memory:
                return True
        contains = getattr(self.cache, "contains", None)
        return bool(contains(key)) if contains is not None else self.cache.get(key) is not None

    def masks(self, image: ImageKey, compute: Callable[[], MaskSet]) -> tuple[MaskSet, bool]:
        """``(masks, was_hit)``: cached, or computed once (see ``get_or_compute``)."""
        return self.get_or_compute(cache_key(image.digest, image.model_id, image.params), compute, MASKS)

    def embeddings(self, image: ImageKey, clip_id: str, n: int, rows: np.ndarray,
                   compute: Callable[[np.ndarray], np.ndarray]) -> Embeddings:
        """The image's cached crop embeddings holding at least ``rows`` (indices into its ``n``
        masks): the rows missing from the entry are ``compute(missing)``-ed (``(len(missing), D)``),
        merged in and stored back.

        One caller per entry at a time in this process (the others wait, then find their rows);
        across processes the store's lock is taken best-effort, and a merge re-reads the entry
        just before writing it, so a race can at worst drop rows another process added meanwhile
        (they are embedded again when asked for), never mix rows of different images or models.
        """
        key = cache_key(image.digest, f"{image.model_id}|{clip_id}|e{EMBEDDINGS_VERSION}", image.params,
                        EMBEDDINGS.prefix)
        rows = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
        if rows.size and (rows[0] < 0 or rows[-1] >= n):
            raise IndexError(f"rows {rows[0]}..{rows[-1]} outside the image's {n} masks")
        with self._key_lock(key):
            entry = self._fitting(self.peek(key, EMBEDDINGS), n)
            if entry is not None and entry.held[rows].all():
                return entry
            if (stored := self._fitting(self._load(key, EMBEDDINGS), n)) is not None:  # rows another replica added
                entry = stored
                if entry.held[rows].all():
                    return self._remember(key, entry, True)[0]
            token = None
            if self._locking is not None:
                token, found = self._lock_or_wait(key, EMBEDDINGS)
                entry = self._fitting(found, n) or entry
            try:
                held = entry.held if entry is not None else np.zeros(n, dtype=bool)
                missing = rows[~held[rows]]
                if not missing.size:
                    return self._remember(key, entry, True)[0]
                new = np.asarray(compute(missing))
                latest = self._fitting(self._load(key, EMBEDDINGS), n) or entry  # rows others stored meanwhile
                if latest is not None and latest.vectors.shape[1] == new.shape[1]:
                    vectors, held = latest.vectors.copy(), latest.held.copy()
                else:
                    vectors, held = np.zeros((n, new.shape[1]), dtype=new.dtype), np.zeros(n, dtype=bool)
                vectors[missing], held[missing] = new, True
                vectors.flags.writeable = held.flags.writeable = False
                value = Embeddings(vectors, held)
                self.cache.put(key, EMBEDDINGS.encode(value))
                with self._mu:
                    self._counts["computes"] += 1
                return self._remember(key, value, False)[0]
            finally:
                if token is not None:
                    self._locking.release(key, token)

    @staticmethod
    def _fitting(entry: Embeddings | None, n: int) -> Embeddings | None:
        return entry if entry is not None and len(entry.held) == n else None

    def _key_lock(self, key: str) -> threading.Lock:
        with self._mu:
            lock = self._key_locks.get(key)
            if lock is None:
                if len(self._key_locks) > 4096:  # bounded: locks of images long done are dropped
                    self._key_locks = {k: v for k, v in self._key_locks.items() if v.locked()}
                lock = self._key_locks[key] = threading.Lock()
            return lock

    def instance_arrays(self, image: ImageKey, recipe: str,
                        compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Named per-instance arrays of the image's masks made by ``recipe`` (a name with its
        version), cached beside the masks."""
        key = cache_key(image.digest, f"{image.model_id}|{recipe}", image.params, NAMED_ARRAYS.prefix)
        return self.get_or_compute(key, compute, NAMED_ARRAYS)[0]

    # ----------------------------------------------------------------- mechanism
    def get_or_compute(self, key: str, compute: Callable[[], T], kind: EntryKind[T] = MASKS) -> tuple[T, bool]:
        """``(value, was_hit)``; ``was_hit`` is False only for the call that ran ``compute``.

        Concurrent callers for the same key share one computation; its exception is
        raised to all of them, and the next call for the key tries again.
        """
        with self._mu:
            value = self._memory.get(key)
            if value is not None:
                self._memory.move_to_end(key)
                self._counts["memory_hits"] += 1
                return value, True
            fut = self._inflight.get(key)
            leader = fut is None
            if leader:
                fut = self._inflight[key] = Future()
            else:
                self._counts["coalesced"] += 1
        if not leader:
            return fut.result()[0], True
        try:
            result = self._load_or_compute(key, compute, kind)
            fut.set_result(result)
            return result
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._mu:
                self._inflight.pop(key, None)

    def peek(self, key: str, kind: EntryKind[T] = MASKS) -> T | None:
        """The entry if it is in memory or in the cache; never computes."""
        with self._mu:
            value = self._memory.get(key)
            if value is not None:
                self._memory.move_to_end(key)
                self._counts["memory_hits"] += 1
                return value
        value = self._load(key, kind)
        return None if value is None else self._remember(key, value, True)[0]

    def _load_or_compute(self, key: str, compute: Callable[[], T], kind: EntryKind[T]) -> tuple[T, bool]:
        value = self._load(key, kind)
        if value is not None:
            return self._remember(key, value, True)
        token = None
        if self._locking is not None:
            token, value = self._lock_or_wait(key, kind)
            if value is not None:
                if token is not None:
                    self._locking.release(key, token)
                return self._remember(key, value, True)
        try:
            value = compute()
            self.cache.put(key, kind.encode(value))
            with self._mu:
                self._counts["computes"] += 1
                self._corrupt_seen.discard(key)
        finally:
            if token is not None:
                self._locking.release(key, token)
        return self._remember(key, value, False)

    def _lock_or_wait(self, key: str, kind: EntryKind[T]) -> tuple[str | None, T | None]:
        """Take the cross-process lock, or poll until its holder stores the entry (bounded)."""
        deadline = time.monotonic() + self.lock_wait_s
        delay, waited = self.poll_s[0], False
        while True:
            token = self._locking.acquire(key, self.lock_ttl_s)
            if token is not None:  # ours: re-check, a holder may have finished just before
                return token, (self._load(key, kind) if waited else None)
            if not waited:
                waited = True
                with self._mu:
                    self._counts["lock_waits"] += 1
            if time.monotonic() >= deadline:
                log.warning("waited %.1f s for another worker to compute %s; computing here",
                            self.lock_wait_s, key)  # fmt: skip
                return None, None
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, self.poll_s[1])
            value = self._load(key, kind)
            if value is not None:
                return None, value

    def _load(self, key: str, kind: EntryKind[T]) -> T | None:
        data = self.cache.get(key)
        if data is None:
            return None
        try:
            return kind.decode(data)
        except CorruptEntry as exc:
            with self._mu:
                first = key not in self._corrupt_seen
                if first:
                    self._counts["corrupt"] += 1
                    if len(self._corrupt_seen) > 1024:
                        self._corrupt_seen.clear()
                    self._corrupt_seen.add(key)
            if first:  # once per key, not per poll while another worker recomputes it
                log.warning("corrupt cache entry %s (%s); recomputing and overwriting it", key, exc)
            return None

    def _remember(self, key: str, value: T, hit: bool) -> tuple[T, bool]:
        with self._mu:
            if hit:
                self._counts["cache_hits"] += 1
            if self.memory_entries > 0:
                self._memory[key] = value
                self._memory.move_to_end(key)
                while len(self._memory) > self.memory_entries:
                    self._memory.popitem(last=False)
        return value, hit

    def stats(self) -> dict:
        with self._mu:
            return {**self._counts, "memory_entries": len(self._memory), "cache": self.cache.stats()}
