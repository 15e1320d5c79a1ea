"""Byte caches for encoded mask sets, and ``MaskStore``: codec + cache + single-flight.

The caches store opaque ``bytes`` under string keys and know nothing of prompts or
HTTP. ``MaskCache`` implementations never raise on backend failures: a broken Redis
degrades to misses and no-op writes (a WARNING once per outage, INFO on recovery).

``MaskStore.get_or_compute`` answers from, in order: a small in-process LRU of decoded
entries, the byte cache, or ``compute()`` -- run once per key across threads of this
process (single-flight) and, with Redis, at most once at a time across processes
(best-effort ``SET NX PX`` lock; other processes poll for the result).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from enum import Enum
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .codec import SCHEMA_VERSION, CorruptEntry, decode_entry, encode_entry
from .masks import MaskSet

log = logging.getLogger(__name__)

Entry = tuple[MaskSet, dict[str, np.ndarray]]


def cache_key(image_digest: str, model_id: str, params: Mapping[str, object]) -> str:
    """Stable key for the masks of one image under one model and inference parameters.

    Includes the codec schema version, so a format change never reads old entries.
    ``params`` is canonicalized (sorted keys, enums by value) and hashed with ``model_id``.
    """
    canon = json.dumps(
        [model_id, {str(k): params[k] for k in sorted(params, key=str)}],
        sort_keys=True, separators=(",", ":"), default=_json_default,
    )  # fmt: skip
    digest = hashlib.sha256(canon.encode()).hexdigest()[:16]
    model = re.sub(r"[^A-Za-z0-9._-]", "_", model_id.rsplit("/", 1)[-1])[:48]
    return f"masks:v{SCHEMA_VERSION}:{model}:{digest}:{image_digest}"


def _json_default(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


@runtime_checkable
class MaskCache(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, value: bytes) -> None: ...
    def stats(self) -> dict: ...


@runtime_checkable
class LockingCache(MaskCache, Protocol):
    """A cache shared between processes that can also hold short per-key locks."""

    def acquire(self, key: str, ttl_s: float) -> str | None: ...
    def release(self, key: str, token: str) -> None: ...


class EmbeddedCache:
    """In-process LRU bounded by ``max_bytes`` (value + key lengths); ``ttl_s`` 0 = no expiry."""

    def __init__(self, max_bytes: int, ttl_s: float = 0, *, clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.ttl_s, self._clock = max_bytes, ttl_s, clock
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "errors": 0, "evictions": 0}

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._data.get(key)
            if item is not None and item[1] and item[1] <= self._clock():
                self._drop(key)
                item = None
            if item is None:
                self._counts["misses"] += 1
                return None
            self._data.move_to_end(key)
            self._counts["hits"] += 1
            return item[0]

    def put(self, key: str, value: bytes) -> None:
        value = bytes(value)
        size = len(value) + len(key)
        with self._lock:
            if key in self._data:
                self._drop(key)
            if size > self.max_bytes:
                return  # larger than the whole budget (or cache disabled with max_bytes=0)
            expires = self._clock() + self.ttl_s if self.ttl_s else 0.0
            self._data[key] = (value, expires)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._data)))
                self._counts["evictions"] += 1

    def _drop(self, key: str) -> None:
        value, _ = self._data.pop(key)
        self._bytes -= len(value) + len(key)

    def stats(self) -> dict:
        with self._lock:
            return {"backend": "embedded", **self._counts, "entries": len(self._data),
                    "bytes": self._bytes, "max_bytes": self.max_bytes}  # fmt: skip


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log)."""
    url = re.sub(r"(?i)(password=)[^&]*", r"\1***", url)  # redis-py also takes ?password=
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rsplit("@", 1)[-1]
        user = f"{parts.username}:" if parts.username else ":"
        return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))
    except ValueError:
        return "<unparsable redis url>"


_RELEASE_LUA = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class RedisCache:
    """Redis-backed ``MaskCache`` (and ``LockingCache``) that never raises to the caller.

    Values are written with ``SETEX`` (``ttl_s`` 0 = no expiry) under ``prefix + key``;
    locks live under ``prefix + "lock:" + key``. After a failure Redis is not tried
    again for ``retry_interval_s`` (calls return misses immediately), so a dead server
    costs at most one connect timeout per interval.
    """

    def __init__(self, url: str, *, prefix: str = "fastsam:", ttl_s: int = 0, connect_timeout_s: float = 0.5,
                 op_timeout_s: float = 2.0, retry_interval_s: float = 1.0, client: Any = None):  # fmt: skip
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.prefix, self.ttl_s, self.retry_interval_s = prefix, int(ttl_s), retry_interval_s
        self.url = redact_url(url)
        self._client = client or redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 1),  # one immediate retry: re-dials a pooled socket after a restart
        )  # fmt: skip
        self._errors_caught = (redis.RedisError, OSError)
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._state = threading.Lock()
        self._down = False
        self._retry_at = 0.0
        self._counts = {"hits": 0, "misses": 0, "errors": 0}

    def _call(self, what: str, fn: Callable[[], Any], default: Any) -> Any:
        if self._down and time.monotonic() < self._retry_at:
            return default
        try:
            result = fn()
        except self._errors_caught as exc:
            with self._state:
                self._counts["errors"] += 1
                self._retry_at = time.monotonic() + self.retry_interval_s
                first, self._down = not self._down, True
            if first:
                log.warning("Redis %s failed (%s: %s); serving without the shared cache until it recovers",
                            self.url, type(exc).__name__, exc)  # fmt: skip
            else:
                log.debug("Redis %s failed again during %s: %s", self.url, what, exc)
            return default
        if self._down:
            with self._state:
                recovered, self._down = self._down, False
            if recovered:
                log.info("Redis reachable again at %s", self.url)
        return result

    def get(self, key: str) -> bytes | None:
        value = self._call("get", lambda: self._client.get(self.prefix + key), None)
        with self._state:
            self._counts["hits" if value is not None else "misses"] += 1
        return value

    def put(self, key: str, value: bytes) -> None:
        if self.ttl_s > 0:
            self._call("put", lambda: self._client.setex(self.prefix + key, self.ttl_s, value), None)
        else:
            self._call("put", lambda: self._client.set(self.prefix + key, value), None)

    def acquire(self, key: str, ttl_s: float) -> str | None:
        """Token if the lock is ours (or Redis failed: proceed unlocked); None if another holder has it."""
        token = uuid.uuid4().hex
        ok = self._call("lock", lambda: self._client.set(self.prefix + "lock:" + key, token, nx=True,
                                                         px=max(1, int(ttl_s * 1000))), True)  # fmt: skip
        return token if ok else None

    def release(self, key: str, token: str) -> None:
        """Delete the lock only if it still holds ``token`` (best effort; it expires anyway)."""
        lock_key = self.prefix + "lock:" + key
        self._call("unlock", lambda: self._release_script(keys=[lock_key], args=[token]), None)

    def stats(self) -> dict:
        with self._state:
            return {"backend": "redis", "url": self.url, "available": not self._down, **self._counts}


def make_cache(settings: Any) -> MaskCache:
    """``RedisCache`` when ``settings.redis_url`` is set, else an ``EmbeddedCache``."""
    if settings.redis_url:
        return RedisCache(settings.redis_url, prefix=settings.cache_prefix, ttl_s=settings.cache_ttl_s)
    return EmbeddedCache(settings.cache_max_bytes, settings.cache_ttl_s)


class MaskStore:
    """Decoded-entry LRU + byte cache + single-flight computation.

    Returned ``MaskSet``s and extras are shared between callers: treat them as read-only
    (decoded arrays are marked read-only).
    """

    def __init__(self, cache: MaskCache, *, memory_entries: int = 8, lock_ttl_s: float = 60.0,
                 lock_wait_s: float = 60.0, poll_s: tuple[float, float] = (0.02, 0.25)):  # fmt: skip
        self.cache = cache
        self.memory_entries, self.lock_ttl_s, self.lock_wait_s, self.poll_s = (
            memory_entries, lock_ttl_s, lock_wait_s, poll_s)  # fmt: skip
        self._locking = cache if isinstance(cache, LockingCache) else None
        self._memory: OrderedDict[str, Entry] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._corrupt_seen: set[str] = set()
        self._mu = threading.Lock()
        self._counts = {"memory_hits": 0, "cache_hits": 0, "computes": 0, "coalesced": 0, "corrupt": 0,
                        "lock_waits": 0}  # fmt: skip

    def get_or_compute(self, key: str, compute: Callable[[], tuple[MaskSet, Mapping | None]]
                       ) -> tuple[MaskSet, dict[str, np.ndarray], bool]:  # fmt: skip
        """``(masks, extras, was_hit)``; ``was_hit`` is False only for the call that ran ``compute``.

        Concurrent callers for the same key share one computation; its exception is
        raised to all of them, and the next call for the key tries again.
        """
        with self._mu:
            entry = self._memory.get(key)
            if entry is not None:
                self._memory.move_to_end(key)
                self._counts["memory_hits"] += 1
                return entry[0], entry[1], True
            fut = self._inflight.get(key)
            leader = fut is None
            if leader:
                fut = self._inflight[key] = Future()
            else:
                self._counts["coalesced"] += 1
        if not leader:
            ms, extras, _ = fut.result()
            return ms, extras, True
        try:
            result = self._load_or_compute(key, compute)
            fut.set_result(result)
            return result
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._mu:
                self._inflight.pop(key, None)

    def peek(self, key: str) -> tuple[MaskSet, dict[str, np.ndarray]] | None:
        """The entry if it is in memory or in the cache; never computes."""
        with self._mu:
            entry = self._memory.get(key)
            if entry is not None:
                self._memory.move_to_end(key)
                self._counts["memory_hits"] += 1
                return entry
        entry = self._load(key)
        if entry is None:
            return None
        ms, extras, _ = self._remember(key, entry, True)
        return ms, extras

    def _load_or_compute(self, key: str, compute: Callable[[], tuple[MaskSet, Mapping | None]]):
        entry = self._load(key)
        if entry is not None:
            return self._remember(key, entry, True)
        token = None
        if self._locking is not None:
            token, entry = self._lock_or_wait(key)
            if entry is not None:
                if token is not None:
                    self._locking.release(key, token)
                return self._remember(key, entry, True)
        try:
            ms, extras = compute()
            extras = dict(extras or {})
            self.cache.put(key, encode_entry(ms, extras))
            with self._mu:
                self._counts["computes"] += 1
                self._corrupt_seen.discard(key)
        finally:
            if token is not None:
                self._locking.release(key, token)
        return self._remember(key, (ms, extras), False)

    def _lock_or_wait(self, key: str) -> tuple[str | None, Entry | None]:
        """Take the cross-process lock, or poll until its holder stores the entry (bounded)."""
        deadline = time.monotonic() + self.lock_wait_s
        delay, waited = self.poll_s[0], False
        while True:
            token = self._locking.acquire(key, self.lock_ttl_s)
            if token is not None:  # ours: re-check, a holder may have finished just before
                return token, (self._load(key) if waited else None)
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
            entry = self._load(key)
            if entry is not None:
                return None, entry

    def _load(self, key: str) -> Entry | None:
        data = self.cache.get(key)
        if data is None:
            return None
        try:
            return decode_entry(data)
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

    def _remember(self, key: str, entry: Entry, hit: bool) -> tuple[MaskSet, dict[str, np.ndarray], bool]:
        with self._mu:
            if hit:
                self._counts["cache_hits"] += 1
            if self.memory_entries > 0:
                self._memory[key] = entry
                self._memory.move_to_end(key)
                while len(self._memory) > self.memory_entries:
                    self._memory.popitem(last=False)
        return entry[0], entry[1], hit

    def stats(self) -> dict:
        with self._mu:
            return {**self._counts, "memory_entries": len(self._memory), "cache": self.cache.stats()}
