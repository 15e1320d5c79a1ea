"""Caches (embedded LRU, Redis) and ``MaskStore`` single-flight / cross-process locking.

Redis tests use the server at 127.0.0.1:6379 under a private key prefix (deleted
afterwards) and are skipped only when it is unreachable; the outage test starts its
own ``redis-server`` on a free port.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from enum import Enum
from types import SimpleNamespace

import numpy as np
import pytest
import redis

from fastsam_backend.cache.backends import EmbeddedCache, RedisCache, make_cache
from fastsam_backend.cache.store import EMBEDDINGS, Embeddings, ImageKey, MaskStore, cache_key
from fastsam_backend.core.codec import SCHEMA_VERSION, decode_entry, encode_entry
from fastsam_backend.core.masks import MaskSet
from fastsam_backend.quality.net import free_port
from tests.conftest import OwnRedis

LOGGER = "fastsam_backend"  # the caches and the store


def masks(seed: int = 0, n: int = 4) -> MaskSet:
    rng = np.random.default_rng(seed)
    return MaskSet.from_dense(rng.random((n, 20, 30)) < 0.5, rng.random(n))


def same(a: MaskSet, b: MaskSet) -> bool:
    return a.image_size == b.image_size and np.array_equal(a.dense(), b.dense())


# ------------------------------------------------------------------- keys
class Mode(Enum):
    A = "a"


def test_cache_key_is_stable_and_discriminating() -> None:
    base = cache_key("sha256-abc", "models/FastSAM-s.pt", {"imgsz": 1024, "conf": 0.4, "mode": Mode.A})
    assert base == cache_key(
        "sha256-abc", "models/FastSAM-s.pt", {"mode": Mode.A, "conf": 0.4, "imgsz": 1024}
    )
    assert base.startswith(f"masks:v{SCHEMA_VERSION}:FastSAM-s.pt:") and base.endswith(":sha256-abc")
    others = {
        cache_key("sha256-abd", "models/FastSAM-s.pt", {"imgsz": 1024, "conf": 0.4, "mode": Mode.A}),
        cache_key("sha256-abc", "FastSAM-x.pt", {"imgsz": 1024, "conf": 0.4, "mode": Mode.A}),
        cache_key("sha256-abc", "other/FastSAM-s.pt", {"imgsz": 1024, "conf": 0.4, "mode": Mode.A}),
        cache_key("sha256-abc", "models/FastSAM-s.pt", {"imgsz": 1024, "conf": 0.41, "mode": Mode.A}),
        cache_key("sha256-abc", "models/FastSAM-s.pt", {"imgsz": 1024, "conf": 0.4}),
    }
    assert base not in others and len(others) == 5


# --------------------------------------------------------------- embedded
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_embedded_lru_is_bounded_in_bytes() -> None:
    cache = EmbeddedCache(max_bytes=310)  # each entry below: 100 value bytes + 2 key bytes
    for key in ["k1", "k2", "k3"]:
        cache.put(key, b"x" * 100)
    assert cache.get("k1") == b"x" * 100  # k1 becomes the most recently used
    cache.put("k4", b"z" * 100)  # 408 > 310: evicts the least recently used, k2
    assert cache.get("k2") is None
    assert [cache.get(k) is not None for k in ["k1", "k3", "k4"]] == [True, True, True]
    cache.put("k5", b"z" * 100)  # order now k1, k3, k4 (gets above) -> evicts k1
    assert cache.get("k1") is None and cache.get("k3") is not None
    stats = cache.stats()
    assert stats["entries"] == 3 and stats["bytes"] == 306 and stats["evictions"] == 2
    cache.put("big", b"b" * 400)  # larger than the whole budget: not stored, nothing evicted
    assert cache.get("big") is None and cache.stats()["entries"] == 3
    cache.put("k3", b"s")  # replacing updates the byte count
    assert cache.get("k3") == b"s" and cache.stats()["bytes"] == 102 + 102 + 3
    disabled = EmbeddedCache(max_bytes=0)
    disabled.put("a", b"1")
    assert disabled.get("a") is None


def test_embedded_ttl_with_injected_clock() -> None:
    clock = FakeClock()
    cache = EmbeddedCache(max_bytes=10_000, ttl_s=60, clock=clock)
    cache.put("a", b"1")
    clock.now += 59
    assert cache.get("a") == b"1"
    clock.now += 1
    assert cache.get("a") is None and cache.stats()["bytes"] == 0
    forever = EmbeddedCache(max_bytes=10_000, ttl_s=0, clock=clock)
    forever.put("a", b"1")
    clock.now += 10**9
    assert forever.get("a") == b"1"


def test_embedded_thread_safety_smoke() -> None:
    cache = EmbeddedCache(max_bytes=5_000)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(2_000):
                key = f"k{rng.integers(50)}"
                if rng.random() < 0.5:
                    cache.put(key, bytes(int(rng.integers(1, 400))))
                else:
                    value = cache.get(key)
                    assert value is None or set(value) <= {0}
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = cache.stats()
    assert stats["bytes"] <= 5_000
    assert stats["bytes"] == sum(len(k) + len(v) for k, (v, _) in cache._data.items())


# ------------------------------------------------------------------ redis
def _redis_up(port: int, password: str | None = None) -> bool:
    try:
        return bool(redis.Redis(port=port, password=password, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


@pytest.fixture
def redis_prefix():
    if not _redis_up(6379):
        pytest.skip("Redis is not reachable at 127.0.0.1:6379 (CI runs one; start redis-server to run these)")
    prefix = f"fastsam-test-{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis(port=6379)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)


def test_redis_get_put_ttl_and_lock(redis_prefix: str) -> None:
    url = "redis://127.0.0.1:6379/0"
    cache = RedisCache(url, prefix=redis_prefix, ttl_s=120)
    assert cache.get("k") is None
    cache.put("k", b"\x00value\xff")
    assert cache.get("k") == b"\x00value\xff"
    raw = redis.Redis(port=6379)
    assert 0 < raw.ttl(redis_prefix + "k") <= 120
    forever = RedisCache(url, prefix=redis_prefix, ttl_s=0)
    forever.put("f", b"1")
    assert raw.ttl(redis_prefix + "f") == -1
    assert {k: cache.stats()[k] for k in ["hits", "misses", "errors", "available"]} == {
        "hits": 1, "misses": 1, "errors": 0, "available": True}  # fmt: skip

    token = cache.acquire("k", ttl_s=5)
    assert token and forever.acquire("k", ttl_s=5) is None
    assert 0 < raw.pttl(redis_prefix + "lock:k") <= 5000
    cache.release("k", "not-the-token")  # only the holder's token releases
    assert forever.acquire("k", ttl_s=5) is None
    cache.release("k", token)
    assert forever.acquire("k", ttl_s=5) is not None


@pytest.fixture
def private_redis():
    """A password-protected private redis-server (the outage test kills and restarts it)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis(password="s3cret-pw")
    server.start()
    yield server
    server.kill()


def test_redis_outage_degrades_quietly_and_recovers(private_redis: OwnRedis, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    url = f"redis://:{private_redis.password}@127.0.0.1:{private_redis.port}/0"
    cache = RedisCache(url, prefix="t:", ttl_s=60, retry_interval_s=0.0)
    cache.put("k", b"v")
    assert cache.get("k") == b"v"

    private_redis.kill()
    start = time.monotonic()
    for _ in range(25):
        assert cache.get("k") is None
        cache.put("k", b"v2")
        assert cache.acquire("k", 1) is not None  # lock failure = proceed unlocked
    assert time.monotonic() - start < 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "serving without the shared cache" in warnings[0].getMessage()
    assert cache.stats()["available"] is False and cache.stats()["errors"] >= 75

    private_redis.start()  # same port, empty data
    assert cache.get("k") is None
    cache.put("k", b"v3")
    assert cache.get("k") == b"v3"
    infos = [
        r for r in caplog.records if r.levelno == logging.INFO and "Redis reachable again" in r.getMessage()
    ]
    assert len(infos) == 1 and cache.stats()["available"] is True
    assert private_redis.password not in caplog.text and "***" in caplog.text


def test_redis_backoff_skips_calls_while_down() -> None:
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", retry_interval_s=60)
    assert cache.get("a") is None and cache.get("a") is None
    assert cache.stats()["errors"] == 1  # second call skipped without touching the network


def test_make_cache() -> None:
    embedded = make_cache(
        SimpleNamespace(redis_url=None, cache_prefix="p:", cache_ttl_s=5, cache_max_bytes=99)
    )
    assert isinstance(embedded, EmbeddedCache) and embedded.max_bytes == 99 and embedded.ttl_s == 5
    url = "redis://:pw@127.0.0.1:1/0"
    shared = make_cache(SimpleNamespace(redis_url=url, cache_prefix="p:", cache_ttl_s=5, cache_max_bytes=99))
    assert isinstance(shared, RedisCache) and shared.prefix == "p:" and shared.ttl_s == 5
    assert "pw" not in shared.stats()["url"]


# --------------------------------------------------------------- MaskStore
class CountingCache(EmbeddedCache):
    def __init__(self) -> None:
        super().__init__(max_bytes=10**8)
        self.gets = 0

    def get(self, key: str) -> bytes | None:
        self.gets += 1
        return super().get(key)


def _run_threads(n: int, fn) -> list:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_single_flight_computes_once() -> None:
    store, calls, ms = MaskStore(CountingCache()), [], masks()

    def compute():
        calls.append(1)
        time.sleep(0.2)
        return ms

    results = _run_threads(8, lambda: store.get_or_compute("key", compute))
    assert len(calls) == 1
    assert sorted(r[1] for r in results) == [False] + [True] * 7
    assert all(r[0] is ms for r in results)
    assert store.stats()["computes"] == 1 and store.stats()["coalesced"] == 7


def test_single_flight_exception_reaches_all_then_key_is_free() -> None:
    store, calls = MaskStore(CountingCache()), []

    def failing():
        calls.append(1)
        time.sleep(0.2)
        raise RuntimeError("model exploded")

    results = _run_threads(8, lambda: store.get_or_compute("key", failing))
    assert len(calls) == 1 and all(isinstance(r, RuntimeError) for r in results)
    ms, hit = store.get_or_compute("key", masks)
    assert not hit and len(ms) == 4


def test_memory_lru_skips_cache_and_decoded_entries_come_from_cache() -> None:
    cache = CountingCache()
    store = MaskStore(cache, memory_entries=2)
    ms = masks()
    assert store.get_or_compute("a", lambda: ms)[1] is False
    gets = cache.gets
    assert store.get_or_compute("a", lambda: pytest.fail("recomputed"))[0] is ms
    assert cache.gets == gets  # answered from the decoded LRU
    store.get_or_compute("b", lambda: masks(1))
    store.get_or_compute("c", lambda: masks(2))  # evicts "a" from memory
    out, hit = store.get_or_compute("a", lambda: pytest.fail("recomputed"))
    assert hit and out is not ms and same(out, ms) and cache.gets == gets + 3
    fresh = MaskStore(cache)  # another process sharing the byte cache
    assert same(fresh.get_or_compute("b", lambda: pytest.fail("recomputed"))[0], masks(1))


def test_corrupt_entry_is_a_miss_and_overwritten(caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cache = CountingCache()
    cache.put("k", b"FSMS\x01garbage")
    store = MaskStore(cache)
    ms, hit = store.get_or_compute("k", masks)
    assert not hit and store.stats()["corrupt"] == 1
    assert "corrupt cache entry k" in caplog.text
    assert same(decode_entry(cache.get("k"))[0], ms)


def test_dead_redis_store_just_computes() -> None:
    store = MaskStore(RedisCache(f"redis://127.0.0.1:{free_port()}/0"))
    assert store.get_or_compute("k", masks)[1] is False
    assert store.get_or_compute("k", lambda: pytest.fail("recomputed"))[1] is True


def _two_processes(prefix: str, **kw) -> tuple[MaskStore, MaskStore]:
    url = "redis://127.0.0.1:6379/0"
    opts = {"lock_wait_s": 10.0, "poll_s": (0.01, 0.05), **kw}
    return MaskStore(RedisCache(url, prefix=prefix), **opts), MaskStore(
        RedisCache(url, prefix=prefix), **opts
    )


def _start_blocked_compute(store: MaskStore, ms: MaskSet, fail: bool = False):
    started, release, out = threading.Event(), threading.Event(), {}

    def compute():
        started.set()
        release.wait(10)
        if fail:
            raise RuntimeError("worker A failed")
        return ms

    def run():
        try:
            out["a"] = store.get_or_compute("img", compute)
        except RuntimeError as exc:
            out["a"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(5)
    return release, thread, out


def test_cross_process_lock_second_worker_waits_for_first(redis_prefix: str) -> None:
    store_a, store_b = _two_processes(redis_prefix)
    ms = masks()
    release, thread, out = _start_blocked_compute(store_a, ms)
    threading.Timer(0.3, release.set).start()
    got, hit = store_b.get_or_compute("img", lambda: pytest.fail("second worker recomputed"))
    thread.join(5)
    assert hit and same(got, ms)
    assert out["a"][1] is False and store_b.stats()["lock_waits"] == 1
    assert not redis.Redis(port=6379).exists(redis_prefix + "lock:img")  # released


def test_cross_process_holder_failure_lets_waiter_compute(redis_prefix: str) -> None:
    store_a, store_b = _two_processes(redis_prefix)
    release, thread, out = _start_blocked_compute(store_a, masks(), fail=True)
    threading.Timer(0.2, release.set).start()
    start = time.monotonic()
    got, hit = store_b.get_or_compute("img", lambda: masks(9))
    thread.join(5)
    assert isinstance(out["a"], RuntimeError) and not hit and same(got, masks(9))
    assert time.monotonic() - start < 3  # did not sit out lock_wait_s


def test_cross_process_wait_is_bounded(redis_prefix: str, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    redis.Redis(port=6379).set(redis_prefix + "lock:img", "stale-holder", px=30_000)
    (store,) = _two_processes(redis_prefix, lock_wait_s=0.3)[:1]
    start = time.monotonic()
    assert store.get_or_compute("img", masks)[1] is False
    assert 0.25 < time.monotonic() - start < 3 and "computing here" in caplog.text


def test_encode_failure_propagates() -> None:
    store = MaskStore(CountingCache())
    with pytest.raises(TypeError):
        store.get_or_compute("k", lambda: Embeddings(np.array([["x"]]), np.ones(1, bool)), EMBEDDINGS)
    assert encode_entry(masks(), None)  # sanity: the store is still usable
    assert store.get_or_compute("k", masks)[1] is False


class ScriptedLockCache(EmbeddedCache):
    """Lock held by 'another process' on the first try; it stores the entry just before we get the lock."""

    def __init__(self, entry: bytes) -> None:
        super().__init__(max_bytes=10**8)
        self.entry, self.acquires, self.released = entry, 0, []

    def acquire(self, key: str, ttl_s: float) -> str | None:
        self.acquires += 1
        if self.acquires == 1:
            return None
        self.put(key, self.entry)
        return "tok"

    def release(self, key: str, token: str) -> None:
        self.released.append(token)


def test_lock_won_after_holder_finished_is_released_without_recomputing() -> None:
    cache = ScriptedLockCache(encode_entry(masks(3), None))
    store = MaskStore(cache, poll_s=(0.001, 0.001))
    got, hit = store.get_or_compute("k", lambda: pytest.fail("recomputed"))
    assert hit and same(got, masks(3)) and cache.released == ["tok"]


def test_every_kind_of_entry_has_its_own_key_and_is_shared_through_the_byte_cache() -> None:
    cache = CountingCache()
    image = ImageKey("ab" * 32, "fastsam-x", {"imgsz": 640})
    store = MaskStore(cache)
    store.remember_url("/data/upload/1/a.png", image.digest)
    ms, hit = store.masks(image, masks)
    emb = store.embeddings(image, "clip-y", 4, np.arange(4),
                           lambda rows: np.arange(8, dtype=np.float16).reshape(4, 2)[rows]).vectors
    assert not hit and emb.shape == (4, 2)
    assert sorted(k.split(":", 1)[0] for k in cache._data) == ["emb", "masks", "url"]
    other = MaskStore(cache)  # another replica: everything comes from the byte cache
    assert other.digest_for_url("/data/upload/1/a.png") == image.digest
    assert other.digest_for_url("/data/upload/1/b.png") is None
    assert same(other.peek_masks(image), ms)
    got = other.embeddings(image, "clip-y", 4, np.arange(4), lambda rows: pytest.fail("recomputed")).vectors
    assert got.tolist() == emb.tolist() and not got.flags.writeable
    assert other.peek_masks(ImageKey(image.digest, "fastsam-x", {"imgsz": 1024})) is None


def test_a_foreign_url_entry_is_not_trusted_as_a_digest() -> None:
    cache = CountingCache()
    store = MaskStore(cache)
    store.remember_url("/a.png", "ab" * 32)
    (key,) = cache._data
    cache.put(key, b"../../etc/passwd")
    assert store.digest_for_url("/a.png") is None


def test_embeddings_are_embedded_by_rows_and_a_later_caller_gets_the_rows_it_misses() -> None:
    """The ``emb:`` entry says which rows it holds: a caller asking for rows it lacks embeds just
    those (in this replica or another), merged into the entry; rows held are never recomputed."""
    cache = CountingCache()
    image = ImageKey("cd" * 32, "fastsam-x", {"imgsz": 640})
    table = np.arange(12, dtype=np.float16).reshape(6, 2) + 1
    asked: list[list[int]] = []

    def compute(rows: np.ndarray) -> np.ndarray:
        asked.append(rows.tolist())
        return table[rows]

    store = MaskStore(cache)
    first = store.embeddings(image, "clip-y", 6, [4, 1, 4], compute)
    assert asked == [[1, 4]] and first.held.tolist() == [False, True, False, False, True, False]
    assert first.vectors[[1, 4]].tolist() == table[[1, 4]].tolist() and not first.vectors[[0, 2, 3, 5]].any()
    other = MaskStore(cache)  # another replica reads the entry and embeds only what it lacks
    both = other.embeddings(image, "clip-y", 6, [0, 1], compute)
    assert asked == [[1, 4], [0]] and both.held.tolist() == [True, True, False, False, True, False]
    assert both.vectors[[0, 1, 4]].tolist() == table[[0, 1, 4]].tolist()
    assert store.embeddings(image, "clip-y", 6, [0], compute).vectors[0].tolist() == table[0].tolist()
    assert asked == [[1, 4], [0]]  # the first replica found row 0 in the byte cache
    with pytest.raises(IndexError):
        store.embeddings(image, "clip-y", 6, [6], compute)
    assert store.embeddings(image, "clip-other", 6, [0], compute).held.sum() == 1  # CLIP identity: own entry
    assert asked[-1] == [0]
