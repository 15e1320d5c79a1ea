"""Redis faults against ``RedisCache`` and ``MaskStore``, on a ``redis-server`` of our own.

Each test starts its own server on a free port (no persistence) and kills it afterwards:
killed mid-run, restarted, answering slowly (``DEBUG SLEEP``), full (``maxmemory`` +
``noeviction``), and holding corrupt, foreign or truncated entries. The caller must never see
an exception, only misses and recomputation, and be told once.
"""

from __future__ import annotations

import logging
import struct
import threading
import time

import numpy as np
import pytest
import redis

from fastsam_backend.cache.backends import RedisCache
from fastsam_backend.cache.store import MaskStore
from fastsam_backend.core.codec import SCHEMA_VERSION, encode_entry
from fastsam_backend.core.masks import MaskSet

LOGGER = "fastsam_backend"  # the caches and the store


def masks(seed: int = 0) -> MaskSet:
    rng = np.random.default_rng(seed)
    return MaskSet.from_dense(rng.random((3, 16, 24)) < 0.5, rng.random(3))


def same(a: MaskSet, b: MaskSet) -> bool:
    return a.image_size == b.image_size and np.array_equal(a.dense(), b.dense())



def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER) and r.levelno == logging.WARNING]


# --- killed, restarted ---------------------------------------------------------------------------------
@pytest.mark.slow  # seconds of waiting: the full lane (make test), not make test-fast
def test_killed_mid_run_then_restarted(own_redis, caplog):
    """Gets become misses, puts no-ops, one warning; after a restart the same objects use Redis again."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    cache = RedisCache(own_redis.url, prefix="t:", ttl_s=60, retry_interval_s=0.05, op_timeout_s=0.5)
    store = MaskStore(cache, memory_entries=0)  # every call goes to Redis
    store.get_or_compute("before", lambda: masks(1))
    errors: list[BaseException] = []
    stop = threading.Event()
    computed: list[int] = []

    def traffic() -> None:  # a worker serving requests while Redis dies under it
        i = 0
        while not stop.is_set():
            try:
                store.get_or_compute(f"k{i % 5}", lambda i=i: (computed.append(i), masks(i % 5))[1])
                cache.get("before")
            except BaseException as exc:  # pragma: no cover - the assertion below reports it
                errors.append(exc)
            i += 1

    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(0.2)
    own_redis.kill()
    time.sleep(0.4)
    down_at = len(computed)
    started = time.monotonic()
    assert cache.get("before") is None  # a miss, at once
    cache.put("x", b"1")  # a no-op
    assert time.monotonic() - started < 1.0
    time.sleep(0.2)
    assert len(computed) > down_at  # still serving, by computing
    own_redis.start()  # same port, empty
    time.sleep(0.3)
    stop.set()
    thread.join(10)
    assert not errors, errors[:3]
    assert len([w for w in warnings(caplog) if "serving without the shared cache" in w]) == 1

    # the very same objects use Redis again: what they write another worker reads
    store.get_or_compute("after", lambda: masks(7))
    other = MaskStore(RedisCache(own_redis.url, prefix="t:"))
    got, hit = other.get_or_compute("after", lambda: pytest.fail("the restarted Redis was not written"))
    assert hit and same(got, masks(7)) and cache.stats()["available"] is True
    own_redis.raw().set("t:direct", b"v")
    assert cache.get("direct") == b"v"


def test_lock_holder_loses_redis_mid_compute(own_redis):
    """Redis dies between taking the lock and storing the entry: the caller still gets its masks."""
    store = MaskStore(RedisCache(own_redis.url, prefix="t:", retry_interval_s=0.05, op_timeout_s=0.5))

    def compute():
        own_redis.kill()
        return masks(2)

    got, hit = store.get_or_compute("img", compute)
    assert not hit and same(got, masks(2))


# --- slow ----------------------------------------------------------------------------------------------------
@pytest.mark.slow  # seconds of waiting: the full lane (make test), not make test-fast
@pytest.mark.parametrize("own_redis", [("--enable-debug-command", "local")], indirect=True)
def test_slow_redis_is_bounded_by_the_socket_timeout(own_redis, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cache = RedisCache(own_redis.url, prefix="t:", op_timeout_s=0.3, retry_interval_s=0.05)
    cache.put("k", encode_entry(masks(3)))
    store = MaskStore(cache, memory_entries=0)
    sleeper = threading.Thread(target=lambda: own_redis.raw(socket_timeout=10).execute_command("DEBUG", "SLEEP", "2"))
    sleeper.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert cache.get("k") is None  # gave up waiting: a miss
    first = time.monotonic() - started
    got, hit = store.get_or_compute("k", lambda: masks(3))  # computed, not waited for
    assert not hit and same(got, masks(3))
    total = time.monotonic() - started
    assert first <= 2 * 0.3 + 0.3 and total <= 1.5, (first, total)  # one immediate retry at most
    sleeper.join(5)
    time.sleep(0.1)
    assert cache.get("k") is not None  # Redis is fast again: used again
    assert len(warnings(caplog)) == 1


# --- full --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("own_redis", [("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")], indirect=True)
def test_full_redis_refuses_writes_quietly(own_redis, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    raw = own_redis.raw()
    raw.config_set("maxmemory", "0")
    cache = RedisCache(own_redis.url, prefix="t:")
    cache.put("kept", encode_entry(masks(4)))
    raw.config_set("maxmemory", "1mb")
    with pytest.raises(redis.exceptions.OutOfMemoryError):  # fill it up
        for i in range(10_000):
            raw.set(f"filler:{i}", b"x" * 10_000)
    cache.put("new", encode_entry(masks(5)))  # refused by Redis, no exception here
    assert raw.get("t:new") is None
    store = MaskStore(cache, memory_entries=0)
    got, hit = store.get_or_compute("new", lambda: masks(5))  # lock and put fail, masks come back
    assert not hit and same(got, masks(5))
    assert any("OOM" in w or "OutOfMemory" in w for w in warnings(caplog))


@pytest.mark.parametrize("own_redis", [("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")], indirect=True)
def test_full_redis_still_answers_reads(own_redis):
    raw = own_redis.raw()
    raw.config_set("maxmemory", "0")
    cache = RedisCache(own_redis.url, prefix="t:")
    cache.put("kept", encode_entry(masks(4)))
    raw.config_set("maxmemory", "1mb")
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        for i in range(10_000):
            raw.set(f"filler:{i}", b"x" * 10_000)
    cache.put("new", b"refused")
    assert cache.get("kept") is not None  # right after the refused write


# --- corrupt, foreign, truncated entries --------------------------------------------------------------------
VALID = encode_entry(masks(6), {"clip": np.ones((3, 4), np.float16)})


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


BAD_ENTRIES = {
    "empty": b"",
    "foreign text": b"hello from another app",
    "foreign JSON": b'{"masks": [], "version": 1}',
    "a pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
    "magic only": b"FSMS",
    "header only": VALID[:32],
    "truncated by one byte": VALID[:-1],
    "truncated to half": VALID[: len(VALID) // 2],
    "one byte flipped in the body": _flip(VALID, len(VALID) // 2),
    "next schema version": VALID[:4] + bytes([SCHEMA_VERSION + 1]) + VALID[5:],
    "a claimed 2**31 instances": VALID[:16] + struct.pack("<I", 2**31) + VALID[20:],
    "a claimed 1e6 x 1e6 image": VALID[:8] + struct.pack("<II", 10**6, 10**6) + VALID[16:],
    "trailing garbage": VALID + b"\0" * 7,
}


@pytest.mark.parametrize("value", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_bad_entries_in_redis_are_recomputed_and_overwritten(own_redis, value, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    own_redis.raw().set("t:img", value)
    store = MaskStore(RedisCache(own_redis.url, prefix="t:"))
    assert store.peek("img") is None  # looking never raises
    got, hit = store.get_or_compute("img", lambda: masks(6))
    assert not hit and same(got, masks(6)) and store.stats()["corrupt"] == 1
    assert any("corrupt cache entry img" in w for w in warnings(caplog))
    fresh = MaskStore(RedisCache(own_redis.url, prefix="t:"))  # another worker reads the rewritten entry
    again, hit = fresh.get_or_compute("img", lambda: pytest.fail("not overwritten"))
    assert hit and same(again, masks(6))


def test_a_foreign_url_digest_entry_is_ignored(make_settings, image_server):
    from fastsam_backend.cache.store import url_key
    from fastsam_backend.quality.fake import GroundTruthSegmenter
    from fastsam_backend.server import create_app
    from fastsam_backend.service.orchestrator import build_service
    from tests.helpers import LABEL_CONFIG, png_bytes

    root, base = image_server
    (root / "faults.png").write_bytes(png_bytes(np.full((32, 48, 3), 128, np.uint8)))
    settings = make_settings(label_studio_url=base, default_label="Banana")
    app = create_app(settings, build_service(settings, GroundTruthSegmenter()))  # no model needed here
    app.extensions["fastsam_service"].store.cache.put(url_key("/faults.png"), b"\xff\xfe not a digest")
    response = app.test_client().post("/predict", json={"tasks": [{"data": {"image": "/faults.png"}}],
                                                        "label_config": LABEL_CONFIG})
    assert response.status_code == 200, response.json
