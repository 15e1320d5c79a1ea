"""``fastsam-backend worker | warm | preannotate``: the job queues from the command line."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from fastsam_backend.settings import Settings, load_settings

KINDS = ("learn", "warm", "preannotate")  # the default queues, in priority order


def _settings(ls_url: str | None = None, api_key: str | None = None, **more: Any) -> Settings:
    overrides = {"label_studio_url": ls_url, "label_studio_api_key": api_key, **more}
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def _queues(settings: Settings):
    from fastsam_backend.jobs.queues import JobQueues, QueueConfig

    config = QueueConfig.from_settings(settings)
    if config is None:
        raise click.UsageError("the job queues need REDIS_URL (or QUEUE_REDIS_URL)")
    return JobQueues(config)


def _redis_outage(exc: Exception, settings: Settings, resume: str) -> None:
    """One line and exit 75 (EX_TEMPFAIL) for an outage that outlasted ``--max-outage``: an expected
    fault, so no traceback; the resume command is safe (finished work is skipped)."""
    from urllib.parse import urlsplit

    where = urlsplit(settings.queue_redis_url or settings.redis_url or "").netloc.rpartition("@")[2]  # no password
    click.echo(f"error: Redis at {where} stayed unreachable for {exc.seconds:.0f} s while {exc.what}; "
               f"when it is back, run `{resume}` to resume (finished work is skipped)", err=True)
    sys.exit(75)


def _bar(desc: str):
    from tqdm import tqdm

    def make(total: int):
        # images/s and the ETA; on stderr, so stdout keeps only the summary
        return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                    smoothing=0.1)

    return make


def _client(settings: Settings, project: int):
    from fastsam_backend.ls.project import ProjectClient

    if not settings.label_studio_url or settings.label_studio_api_key is None:
        raise click.UsageError("give --url and --api-key (or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
    return ProjectClient(settings.label_studio_url, settings.label_studio_api_key.get_secret_value(), project)


@click.command()
@click.option("--queues", "-q", "kinds", multiple=True, type=click.Choice((*KINDS, "train")),
              help="queues to take jobs from, in priority order [default: learn (annotation webhooks), warm, "
                   "then preannotate; train (fine-tuning) only when named]")
@click.option("--processes", "-n", type=click.IntRange(1, 64), default=1, show_default=True,
              help="worker processes on this machine, each loading the models once")
@click.option("--burst", is_flag=True, help="exit once the queues are empty")
def worker(kinds: tuple[str, ...], processes: int, burst: bool) -> None:
    """Take learn, warm and pre-annotate jobs from the queues in Redis (REDIS_URL)."""
    from fastsam_backend.jobs.queues import JobKind, QueueConfig
    from fastsam_backend.jobs.worker import run_worker, supervise
    from fastsam_backend.logs import configure_logging

    settings = load_settings(batch_time_budget_s=0)  # no Label Studio deadline here: every task gets done
    configure_logging(settings.log_level)
    config = QueueConfig.from_settings(settings)
    if config is None:
        raise click.UsageError("the worker needs REDIS_URL (or QUEUE_REDIS_URL)")
    names = [config.queue_name(JobKind(k)) for k in (kinds or KINDS)]
    if processes == 1:
        run_worker(settings, names, burst=burst)
    else:
        sys.exit(supervise({"batch_time_budget_s": 0}, names, processes, burst=burst))


@click.command()
@click.argument("urls", nargs=-1)
@click.option("--project", type=int, default=None, help="warm every task image of this Label Studio project")
@click.option("--task", "task_id", type=click.IntRange(min=0), default=None,
              help="the Label Studio task the URLs given belong to (cloud storage URIs, s3:// gs:// "
                   "azure-blob://, are fetched through Label Studio per task)")
@click.option("--url", "ls_url", default=None, help="Label Studio URL [env LABEL_STUDIO_URL]")
@click.option("--api-key", default=None, help="Label Studio token [env LABEL_STUDIO_API_KEY]")
@click.option("--wait", is_flag=True, help="follow the jobs until they are done (progress bar)")
@click.option("--max-outage", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="seconds to wait for an unreachable Redis before giving up (exit 75)")
def warm(urls: tuple[str, ...], project: int | None, task_id: int | None, ls_url: str | None, api_key: str | None,
         wait: bool, max_outage: float) -> None:
    """Enqueue warm jobs: the images of --project, or the URLs/paths given. Cached images are skipped."""
    from fastsam_backend.jobs.outage import RedisOutage

    try:
        _warm(urls, project, task_id, ls_url, api_key, wait, max_outage)
    except RedisOutage as exc:
        resume = "fastsam-backend warm " + (f"--project {project}" if project is not None else "...") + " --wait"
        _redis_outage(exc, _settings(ls_url, api_key), resume)


def _warm(urls: tuple[str, ...], project: int | None, task_id: int | None, ls_url: str | None, api_key: str | None,
          wait: bool, max_outage: float) -> None:
    from fastsam_backend.images.cloud import ImageRef
    from fastsam_backend.jobs.enqueue import enqueue_warm, model_key, warm_job_id
    from fastsam_backend.jobs.outage import RedisWait
    from fastsam_backend.logs import configure_logging
    from fastsam_backend.ls.labelconfig import parse_label_config
    from fastsam_backend.service.orchestrator import build_service

    settings = _settings(ls_url, api_key)
    configure_logging("WARNING")
    if not urls and project is None:
        raise click.UsageError("give --project ID or image URLs")
    targets = [ImageRef(url, task_id) for url in urls]
    if project is not None:
        client = _client(settings, project)
        key = parse_label_config(client.label_config()).image_key
        targets += [ImageRef(t.data[key], t.id) for t in client.tasks() if isinstance(t.data.get(key), str)]
    service = build_service(settings)  # for the model identity and the cache: nothing is loaded
    queues = _queues(settings)
    redis_wait = RedisWait(limit_s=max_outage)
    report = redis_wait.call(enqueue_warm, queues, service, targets, what="enqueueing the warm jobs")
    click.echo(f"{len(targets)} images: {report.enqueued} warm jobs enqueued, {report.duplicate} queued or running "
               f"already, {report.cached} cached already")
    if wait and report.job_ids:
        model = model_key(service)
        url_of = {warm_job_id(queues.config, service.images.memo_key(ref), model): ref for ref in targets}
        outcomes = follow(queues, report.job_ids, _bar("warming"), redis_wait,
                          is_done=lambda job_id: service.image_key_if_cached(url_of[job_id]) is not None,
                          requeue=lambda job_id: enqueue_warm(queues, service, [url_of[job_id]]))
        click.echo("warm jobs: " + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())))
        if outcomes.get("failed"):
            sys.exit(1)


def follow(queues, job_ids: list[str], progress, redis_wait, is_done, requeue, poll_s: float = 0.5) -> dict[str, int]:
    """Wait for the warm jobs ``job_ids`` to end, through Redis outages and jobs lost with a Redis
    that restarted empty (``jobs/follow.py``); how many ended how (``computed``, ``cached``, ``failed``)."""
    from tqdm import tqdm

    from fastsam_backend.jobs.follow import Follower
    from fastsam_backend.jobs.queues import JobKind

    outcomes: dict[str, int] = {}
    bar = progress(len(job_ids))

    def ended(state) -> None:
        outcome = (state.result or {}).get("outcome") or ("done" if state.status == "finished" else "failed")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        bar.update(1)

    redis_wait.on_wait = lambda s: bar.set_postfix(redis=f"down {s:.0f}s")
    follower = Follower(queues, JobKind.WARM, job_ids, is_done=is_done, requeue=requeue, wait=redis_wait,
                        notify=lambda message: tqdm.write(message, file=sys.stderr),
                        status=lambda fields: bar.set_postfix(**fields))
    try:
        follower.run(ended, poll_s=poll_s)
    finally:
        bar.close()
    return outcomes


@click.command()
@click.option("--url", "ls_url", default=None, help="Label Studio URL [env LABEL_STUDIO_URL]")
@click.option("--api-key", default=None, help="personal access token or legacy token [env LABEL_STUDIO_API_KEY]")
@click.option("--project", type=int, required=True, help="Label Studio project id")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="predict at most this many tasks")
@click.option("--dry-run", is_flag=True, help="predict, but write nothing to Label Studio")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="write the summary (done, skipped, failed with reasons) as JSON")
@click.option("--queue", "queued", is_flag=True, help="enqueue pre-annotate jobs for the workers and follow them")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8, show_default=True,
              help="tasks per predict call (in-process)")
@click.option("--fallback-in-process", "fallback", is_flag=True,
              help="with --queue: when no worker listens, predict the rest in this process instead of waiting")
@click.option("--max-outage", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="with --queue: seconds to wait for an unreachable Redis before giving up (exit 75)")
def preannotate(ls_url: str | None, api_key: str | None, project: int, limit: int | None, dry_run: bool,
                report_path: str | None, queued: bool, batch_size: int, fallback: bool, max_outage: float) -> None:
    """Pre-annotate a whole project: tasks with a prediction of this model_version are skipped, so
    running it again resumes. Ctrl-C stops after the current batch and prints the summary."""
    from tqdm import tqdm

    from fastsam_backend.jobs.outage import RedisOutage
    from fastsam_backend.jobs.preannotate_project import StopFlag
    from fastsam_backend.logs import configure_logging
    from fastsam_backend.ls.project import describe, transient
    from fastsam_backend.service.orchestrator import build_service

    settings = _settings(ls_url, api_key, batch_time_budget_s=0)
    configure_logging("DEBUG" if settings.log_level.upper() == "DEBUG" else "WARNING")  # the bar is the news
    client = _client(settings, project)
    service = build_service(settings)
    stop = StopFlag(notify=lambda message: tqdm.write(message, file=sys.stderr))
    resume = f"fastsam-backend preannotate --project {project}" + (" --queue" if queued else "")
    if queued and dry_run:
        raise click.UsageError("--dry-run predicts in this process; it does not go with --queue")
    try:
        with stop.on_sigint():
            summary = _preannotate(settings, service, client, stop, queued=queued, limit=limit, dry_run=dry_run,
                                   batch_size=batch_size, fallback=fallback, max_outage=max_outage)
    except RedisOutage as exc:
        _redis_outage(exc, settings, resume)
    except Exception as exc:
        if not transient(exc):
            raise
        # Label Studio away longer than its retries (ls/project.py): an expected fault, one line
        click.echo(f"error: Label Studio at {settings.label_studio_url} did not answer ({describe(exc)}); when it is "
                   f"back, run `{resume}` to resume (predicted tasks are skipped)", err=True)
        sys.exit(75)
    click.echo(summary.text())
    if report_path:
        with open(report_path, "w") as f:
            json.dump(summary.as_dict(), f, indent=2)
    if summary.interrupted:
        sys.exit(130)
    if summary.failed:
        sys.exit(1)


def _preannotate(settings: Settings, service, client, stop, *, queued: bool, limit: int | None, dry_run: bool,
                 batch_size: int, fallback: bool, max_outage: float):
    """The run of ``preannotate``: on the workers' queue (then, with ``fallback`` and no worker, in
    this process), or in this process; its ``Summary``."""
    from tqdm import tqdm

    from fastsam_backend.errors import ModelUnavailable
    from fastsam_backend.jobs.preannotate_project import run_in_process, run_queued

    def load() -> None:
        try:
            service.segmenter.load()  # before the bar, so its rate is images, not the load
        except ModelUnavailable as exc:
            raise click.ClickException(exc.message) from None

    if not queued:
        load()
        return run_in_process(service, client, limit=limit, dry_run=dry_run, batch_size=batch_size, stop=stop,
                              progress=_bar("pre-annotating"))
    version = service.project_version(str(client.project_id))
    summary = run_queued(_queues(settings), client, version, limit=limit, stop=stop, fallback=fallback,
                         progress=_bar("pre-annotating (workers)"), outage_limit_s=max_outage,
                         notify=lambda message: tqdm.write(message, file=sys.stderr))
    if summary.no_worker and not stop:
        load()
        rest = run_in_process(service, client, limit=limit, batch_size=batch_size, stop=stop,
                              progress=_bar("pre-annotating (in this process)"))
        summary.mode = "queue, then in-process (no worker)"
        summary.done += rest.done
        summary.failed += rest.failed
        summary.interrupted = rest.interrupted
        summary.seconds = round(summary.seconds + rest.seconds, 2)
    return summary
