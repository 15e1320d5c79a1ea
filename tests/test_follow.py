"""``jobs/follow.py``'s ``Follower`` over a queue stand-in (no Redis): after an outage, jobs that
ended well are checked once more against the source of truth, and those whose work a Redis that
came back empty took along are enqueued again, without counting them twice."""

from __future__ import annotations

from types import SimpleNamespace

from fastsam_backend.jobs.follow import Follower
from fastsam_backend.jobs.outage import RedisWait
from fastsam_backend.jobs.queues import JobKind, JobState


class StandInQueues:
    """``states``/``running``/``live_workers`` as a follower reads them; every job finishes at once."""

    config = SimpleNamespace(queue_name=lambda kind: "fastsam-warm")

    def __init__(self, job_ids: list[str]) -> None:
        self.status = dict.fromkeys(job_ids, "finished")

    def states(self, job_ids: list[str]) -> list[JobState]:
        return [JobState(j, self.status.get(j), result={"outcome": "computed"}) for j in job_ids]

    def running(self, job_ids: list[str]) -> set[str]:
        return set()

    def live_workers(self, kind: JobKind) -> int:
        return 1


def follow(outages: int, cached: set[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """(still open, ended as heard by on_end, requeued, is_done asked) for jobs a, b, c."""
    queues = StandInQueues(["a", "b", "c"])
    wait = RedisWait()
    wait.outages = outages  # an outage happened while the jobs ran
    ended, requeued, asked = [], [], []

    def is_done(job_id: str) -> bool:
        asked.append(job_id)
        return job_id in cached

    def requeue(job_id: str) -> None:
        requeued.append(job_id)
        cached.add(job_id)  # the second run puts the work back
        queues.status[job_id] = "finished"

    follower = Follower(queues, JobKind.WARM, ["a", "b", "c"], is_done=is_done, requeue=requeue, wait=wait)
    still = follower.run(lambda state: ended.append(state.job_id), poll_s=0)
    return still, ended, requeued, asked


def test_after_an_outage_work_lost_with_an_empty_redis_is_done_again_and_counted_once():
    still, ended, requeued, asked = follow(outages=1, cached={"b"})
    assert still == []
    assert requeued == ["a", "c"]
    assert sorted(ended) == ["a", "b", "c"]  # each once, though a and c ran twice
    assert sorted(asked) == ["a", "b", "c"]


def test_without_an_outage_ended_jobs_are_not_checked_again():
    still, ended, requeued, asked = follow(outages=0, cached=set())
    assert (still, requeued, asked) == ([], [], [])
    assert sorted(ended) == ["a", "b", "c"]
