"""``jobs/outage.py`` and the followers' fault handling on a ``redis-server`` of our own (no model):
a call waits out a Redis that is killed and restarted, says so once; a bound turns a longer outage
into ``RedisOutage``; ``stopping`` ends the wait; a wrong password is no outage; ``live_workers``
counts only workers with a recent heartbeat."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis

from fastsam_backend.jobs.outage import RedisOutage, RedisWait, is_outage
from fastsam_backend.jobs.queues import JobKind, JobQueues, QueueConfig, live_workers
from tests.conftest import OwnRedis


def no_retries(server: OwnRedis) -> redis.Redis:
    """redis-py's own retries off, so that each call meets the outage."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return server.raw(socket_timeout=1, retry=Retry(NoBackoff(), 0))


@pytest.mark.slow  # waits out a restart, a bound or retries
def test_a_call_waits_out_a_restart_and_says_so_once(own_redis, caplog):
    caplog.set_level(logging.INFO, logger="fastsam_backend.jobs.outage")
    client = no_retries(own_redis)
    wait = RedisWait(first_wait_s=0.05)
    own_redis.kill()
    restarter = threading.Timer(1.5, own_redis.start)
    restarter.start()
    waited: list[float] = []
    wait.on_wait = waited.append
    assert wait.call(client.set, "k", "v", what="testing") is True
    restarter.join()
    assert client.get("k") == b"v"
    assert len(waited) >= 3 and wait.outages == 1 and wait.down_since is None
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Redis unreachable while testing" in m for m in messages) == 1, messages
    assert sum(m.startswith("Redis is back after") for m in messages) == 1, messages


@pytest.mark.slow  # waits out a restart, a bound or retries
def test_past_the_bound_it_raises_redis_outage(own_redis):
    client = no_retries(own_redis)
    own_redis.kill()
    with pytest.raises(RedisOutage) as err:
        RedisWait(limit_s=0.5, first_wait_s=0.05).call(client.ping, what="pinging")
    assert err.value.what == "pinging" and err.value.seconds >= 0.5


@pytest.mark.slow  # waits out a restart, a bound or retries
def test_stopping_ends_the_wait_with_the_connection_error(own_redis):
    client = no_retries(own_redis)
    own_redis.kill()
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    with pytest.raises(redis.exceptions.ConnectionError):
        RedisWait(stopping=stop.is_set, first_wait_s=0.05).call(client.ping)
    assert stop.is_set()


@pytest.mark.slow  # waits out a restart, a bound or retries
def test_a_wrong_password_is_not_an_outage():
    server = OwnRedis(password="right")
    server.start()
    try:
        client = redis.Redis(port=server.port, password="wrong", socket_connect_timeout=1)
        started = time.monotonic()
        with pytest.raises(redis.exceptions.AuthenticationError) as err:
            RedisWait(limit_s=30).call(client.ping)
        assert not is_outage(err.value) and time.monotonic() - started < 10  # at once, not after the bound
    finally:
        server.kill()


def test_live_workers_counts_recent_heartbeats_per_queue(own_redis):
    from rq.utils import now, utcformat

    config = QueueConfig(own_redis.url)
    queues = JobQueues(config)
    conn = queues.connection
    warm, pre = config.queue_name(JobKind.WARM), config.queue_name(JobKind.PREANNOTATE)
    fresh, stale = utcformat(now()), "2020-01-01T00:00:00.000000Z"
    for key, beat, names in (("rq:worker:a", fresh, (warm, pre)), ("rq:worker:b", stale, (pre,))):
        conn.hset(key, "last_heartbeat", beat)
        for name in names:
            conn.sadd(f"rq:workers:{name}", key)
    conn.sadd(f"rq:workers:{pre}", "rq:worker:gone")  # registered, its key expired
    assert live_workers(conn, [warm, pre, config.queue_name(JobKind.TRAIN)]) == {
        warm: 1, pre: 1, config.queue_name(JobKind.TRAIN): 0}
    assert queues.live_workers(JobKind.PREANNOTATE) == 1


@pytest.mark.slow  # waits out a restart, a bound or retries
def test_label_studio_away_past_its_retries_ends_preannotate_with_one_line(own_redis, make_settings, monkeypatch):
    from click.testing import CliRunner

    from fastsam_backend.cli.jobs import preannotate
    from fastsam_backend.ls import project
    from fastsam_backend.quality.net import free_port

    monkeypatch.setattr(project, "RETRY_FOR_S", 0.5)
    monkeypatch.setattr(project, "ATTEMPTS", 2)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for key, value in {"REDIS_URL": own_redis.url, "LABEL_STUDIO_URL": dead, "LABEL_STUDIO_API_KEY": "f" * 40,
                       "FASTSAM_WEIGHTS": make_settings().fastsam_weights, "FASTSAM_ALLOW_DOWNLOAD": "false",
                       "OUTBOUND_ALLOW": "127.0.0.1", "CLIP_ENABLED": "false"}.items():
        monkeypatch.setenv(key, str(value))
    result = CliRunner().invoke(preannotate, ["--project", "7", "--queue"])
    assert result.exit_code == 75, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: Label Studio at {dead} did not answer (ConnectError: [Errno 111] Connection refused); "
        "when it is back, run `fastsam-backend preannotate --project 7 --queue` to resume "
        "(predicted tasks are skipped)")
    assert "Traceback" not in result.output
