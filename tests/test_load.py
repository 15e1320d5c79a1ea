"""The load test's short form (issue #13): 2,000 interactive requests in Label Studio's body, 8 clients
at once, on cached images, through gunicorn and a private Redis. Asserted: no error and the worker's
RSS grows under 10 % (a leak per request would show); the latencies are reported, not asserted.
The full form: ``python -m bench.load --requests 20000`` (docs/operations.md, Load)."""

from __future__ import annotations

import pytest

from bench.load import measure

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_2000_cached_clicks_from_8_clients_without_errors_or_growth(own_redis, tmp_path, capsys):
    result = measure(tmp_path, 2000, concurrency=8, redis_url=own_redis.url)
    with capsys.disabled():
        print(f"\nload: {result['requests']} requests, p50 {result['p50_ms']} / p95 {result['p95_ms']} / p99 "
              f"{result['p99_ms']} ms, {result['requests_per_s']} req/s, RSS {result['rss_before_mb']} -> "
              f"{result['rss_after_mb']} MiB")
    assert result["warmup"]["errors"] == 0
    assert result["errors"] == 0 and result["ok"] == 2000, result["first_errors"]
    assert result["rss_growth_pct"] and result["max_rss_growth_pct"] < 10
