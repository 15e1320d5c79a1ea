"""Byte caches: opaque ``bytes`` under string keys, embedded (in-process LRU) or Redis.

They know nothing of prompts, HTTP or what the bytes hold (``store.MaskStore`` does).
``MaskCache`` implementations never raise on backend failures: a broken Redis degrades to
misses and no-op writes (a WARNING once per outage, INFO on recovery).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from fastsam_backend.settings import Settings

log = logging.getLogger(__name__)


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

    def contains(self, key: str) -> bool:
        with self._lock:
            item = self._data.get(key)
            return item is not None and not (item[1] and item[1] <= self._clock())

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
        self._refusals = redis.ResponseError  # the server answered (e.g. OOM under noeviction): not down
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._state = threading.Lock()
        self._down = False
        self._refused = False  # a refusal was logged (once)
        self._retry_at = 0.0
        self._counts = {"hits": 0, "misses": 0, "errors": 0}

    def _call(self, what: str, fn: Callable[[], Any], default: Any) -> Any:
        if self._down and time.monotonic() < self._retry_at:
            return default
        try:
            result = fn()
        except self._refusals as exc:
            with self._state:
                self._counts["errors"] += 1
                first, self._refused = not self._refused, True
            (log.warning if first else log.debug)("Redis %s refused %s (%s: %s); the cache is still read",
                                                  self.url, what, type(exc).__name__, exc)
            return default
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

    def contains(self, key: str) -> bool:
        """``EXISTS``: whether an entry is there, without transferring it (False when Redis is down)."""
        return bool(self._call("exists", lambda: self._client.exists(self.prefix + key), 0))

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


def make_cache(settings: Settings) -> MaskCache:
    """``RedisCache`` when ``settings.redis_url`` is set, else an ``EmbeddedCache``."""
    if settings.redis_url:
        return RedisCache(settings.redis_url, prefix=settings.cache_prefix, ttl_s=settings.cache_ttl_s)
    return EmbeddedCache(settings.cache_max_bytes, settings.cache_ttl_s)
