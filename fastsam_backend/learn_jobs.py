"""Alias of an earlier release's module: ``learn`` jobs queued as ``fastsam_backend.learn_jobs.learn_event``
still run (new ones are ``fastsam_backend.jobs.learn.learn_event``). Remove once such queues drained."""

from fastsam_backend.jobs.learn import learn_event

__all__ = ["learn_event"]
