"""Riding through a Redis outage: call again with backoff until Redis answers, say so once.

A Redis restart (a deploy, the OOM killer, a lost node) is an expected fault for the workers and the
commands that follow their jobs, not a crash: ``RedisWait.call(fn)`` retries ``fn`` on connection
errors and timeouts with exponential backoff (tenacity), logs one warning when the outage starts
and one line when Redis is back, and

- in a worker waits as long as it takes (``limit_s=None``), unless ``stopping()`` says the worker
  was asked to stop;
- in ``preannotate --queue`` / ``warm --wait`` gives up after ``limit_s`` with ``RedisOutage``,
  which the command turns into one line naming the fault and the command that resumes.

Only connection-level errors are retried: a wrong password, a command Redis refuses or a full
Redis (``OOM``) are not outages and raise at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import tenacity

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BACKOFF_S = 5.0


class RedisOutage(Exception):
    """Redis stayed unreachable longer than the caller's bound."""

    def __init__(self, what: str, seconds: float, cause: BaseException | None) -> None:
        super().__init__(f"Redis unreachable for {seconds:.0f} s while {what} ({cause})")
        self.what, self.seconds, self.cause = what, seconds, cause


def is_outage(exc: BaseException) -> bool:
    """A lost or refused connection, or a timeout: what a restarting or unreachable Redis looks like."""
    import redis

    if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError):
        return False
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | ConnectionError)


class RedisWait:
    """Calls that wait out a Redis outage; one instance per process or command, so an outage is
    told once however many calls meet it (``down_since`` is when the current one started)."""

    def __init__(self, limit_s: float | None = None, stopping: Callable[[], bool] | None = None,
                 on_wait: Callable[[float], None] | None = None, first_wait_s: float = 0.25) -> None:
        self.limit_s, self.stopping, self.on_wait = limit_s, stopping or (lambda: False), on_wait
        self.first_wait_s = first_wait_s
        self.down_since: float | None = None
        self.outages = 0  # how many began (the followers reconcile after one)

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def call(self, fn: Callable[..., T], *args: Any, what: str = "talking to Redis", **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, again and again while Redis is away (see the module docstring)."""

        def give_up(state: tenacity.RetryCallState) -> bool:
            if self.stopping():
                return True
            return self.limit_s is not None and self.down_for() >= self.limit_s

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.outages += 1
                log.warning("Redis unreachable while %s (%s); waiting for it to come back", what, exc)
            if self.on_wait is not None:
                self.on_wait(self.down_for())

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_outage), stop=give_up, before_sleep=before_sleep,
            wait=tenacity.wait_exponential(multiplier=self.first_wait_s, max=MAX_BACKOFF_S), reraise=True)
        try:
            result = retrying(fn, *args, **kwargs)
        except Exception as exc:
            if is_outage(exc) and self.down_since is not None and not self.stopping():
                raise RedisOutage(what, self.down_for(), exc) from exc
            raise
        if self.down_since is not None:
            log.warning("Redis is back after %.1f s", self.down_for())
            self.down_since = None
        return result
