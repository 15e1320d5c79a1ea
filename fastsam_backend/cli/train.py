"""``fastsam-backend train --project ID``: a project opts in to FastSAM fine-tuning (one train job)."""

from __future__ import annotations

import json

import click

from fastsam_backend.settings import load_settings


@click.command("train")
@click.option("--project", type=int, required=True, help="Label Studio project id")
@click.option("--here", is_flag=True, help="train in this process instead of enqueuing a job for a train worker")
def train(project: int, here: bool) -> None:
    """Fine-tune FastSAM on the project's accepted masks; adopt only if measurably better
    (FINETUNE_ENABLED must be true; docs/fine-tuning.md)."""
    from fastsam_backend.errors import BadRequest
    from fastsam_backend.logs import configure_logging

    settings = load_settings(batch_time_budget_s=0)
    configure_logging(settings.log_level)
    if not settings.finetune_enabled:
        raise click.UsageError("fine-tuning is off: set FINETUNE_ENABLED=true (here and on the train workers)")
    if here:
        from fastsam_backend.jobs.preannotate_project import project_client
        from fastsam_backend.jobs.train import gather, run_training
        from fastsam_backend.service.orchestrator import build_service

        service = build_service(settings)
        try:
            samples, keys = gather(service, project_client(settings, project))
            record = run_training(service, str(project), samples, keys)
        except BadRequest as exc:
            raise click.ClickException(exc.message) from None
        click.echo(json.dumps(record.to_dict(), indent=2))
        return
    from fastsam_backend.jobs.queues import JobQueues, QueueConfig
    from fastsam_backend.jobs.train import enqueue_train

    config = QueueConfig.from_settings(settings)
    if config is None:
        raise click.UsageError("queued training needs REDIS_URL (or QUEUE_REDIS_URL); or use --here")
    job_id, new = enqueue_train(JobQueues(config), project)
    click.echo(f"{'enqueued' if new else 'already queued or running'}: {job_id} on queue "
               f"{config.prefix}train (run `fastsam-backend worker -q train`)")
