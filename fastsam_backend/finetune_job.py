"""Alias of an earlier release's module: ``train`` jobs queued as ``fastsam_backend.finetune_job.train_project``
still run (new ones are ``fastsam_backend.jobs.train.train_project``). Remove once such queues drained."""

from fastsam_backend.jobs.train import train_project

__all__ = ["train_project"]
