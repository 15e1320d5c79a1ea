"""The in-process URL -> digest memo: a warm click asks the byte cache nothing; bounded; expires."""

from __future__ import annotations

from fastsam_backend.cache.store import MaskStore, UrlMemo, url_key
from tests.test_cache import CountingCache

DIGEST_A, DIGEST_B = "a" * 64, "b" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_remembered_url_is_answered_from_memory():
    cache = CountingCache()
    store = MaskStore(cache, url_memo_ttl_s=60)
    store.remember_url("/data/upload/1/a.png", DIGEST_A)
    assert store.digest_for_url("/data/upload/1/a.png") == DIGEST_A
    assert cache.gets == 0


def test_a_url_read_from_the_cache_is_memoized():
    cache = CountingCache()
    cache.put(url_key("/x.png"), DIGEST_A.encode())  # remembered by another replica
    store = MaskStore(cache, url_memo_ttl_s=60)
    assert store.digest_for_url("/x.png") == DIGEST_A
    assert store.digest_for_url("/x.png") == DIGEST_A
    assert cache.gets == 1


def test_off_by_default_and_at_zero_every_lookup_reads_the_cache():
    for store in (MaskStore(CountingCache()), MaskStore(CountingCache(), url_memo_ttl_s=0)):
        store.remember_url("/x.png", DIGEST_A)
        store.digest_for_url("/x.png")
        store.digest_for_url("/x.png")
        assert store.cache.gets == 2


def test_entries_expire_after_ttl_then_the_cache_decides():
    clock = Clock()
    memo = UrlMemo(10, clock=clock)
    memo.put("/x.png", DIGEST_A)
    clock.now = 9.9
    assert memo.get("/x.png") == DIGEST_A
    clock.now = 10.0
    assert memo.get("/x.png") is None


def test_bounded_least_recently_set_goes_first():
    memo = UrlMemo(60, entries=2)
    memo.put("/1", DIGEST_A)
    memo.put("/2", DIGEST_A)
    memo.put("/1", DIGEST_B)  # re-set: now the newest
    memo.put("/3", DIGEST_A)
    assert memo.get("/2") is None and memo.get("/1") == DIGEST_B and memo.get("/3") == DIGEST_A
