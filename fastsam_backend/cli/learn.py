"""``fastsam-backend quality-labels``: label top-1 of pre-annotation against annotated examples per label,
or (``--tasks``) against annotated tasks (docs/learned-labels.md's tables)."""

from __future__ import annotations

import click

from fastsam_backend.cli.output import write_json
from fastsam_backend.settings import load_settings


@click.command("quality-labels")
@click.option("--scenes", type=int, default=40, show_default=True, help="held-out scenes pre-annotated per count")
@click.option("--counts", default=None,
              help="examples per label (default 0,1,3,10,30), or with --tasks annotated tasks (default 0,1,3,5,10,30); "
              "0 = zero-shot")
@click.option("--tasks", "by_tasks", is_flag=True,
              help="by annotated tasks (every object of a task labelled, uneven label frequencies, default options "
              "and LEARN_MIN_EXAMPLES), not by examples per label")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="write the rows as JSON")
@click.option("--dev", is_flag=True, help="pre-annotate development scenes, not the held-out ones (for tuning)")
def quality_labels(scenes: int, counts: str | None, by_tasks: bool, json_out: str | None, dev: bool) -> None:
    """Label top-1 of pre-annotated instances vs annotated examples per label (or tasks), through the webhook
    and /predict paths (embedded cache; each count its own project). By examples, LEARN_MIN_EXAMPLES is set
    to 1 so every count uses its examples; by tasks, the settings are the environment's."""
    from fastsam_backend.logs import configure_logging
    from fastsam_backend.quality.labels_learned import DEV_SEED0, EVAL_SEED0, examples_table, tasks_table
    from fastsam_backend.service.orchestrator import build_service

    configure_logging("WARNING")
    kind = "development" if dev else "held-out"
    if by_tasks:
        service = build_service(load_settings(redis_url=None))
        rows = tasks_table(service, [int(c) for c in (counts or "0,1,3,5,10,30").split(",")], scenes=scenes, dev=dev)
        click.echo(f"model {service.model_version}, {scenes} {kind} scenes (uneven label frequencies), "
                   f"LEARN_MIN_EXAMPLES={service.settings.learn_min_examples}, "
                   f"LEARN_SIGNIFICANCE={service.settings.learn_significance}\n")
        zero = next((r for r in rows if r.tasks == 0), None)
        click.echo("| annotated tasks | label top-1 | zero-shot top-1 | instances matched (zero-shot) | regions "
                   "(zero-shot) | labelled objects | decides | why |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            z = (f"{zero.top1:.3f}", f"{r.instances} ({zero.instances})", f"{r.regions} ({zero.regions})") \
                if zero else ("", str(r.instances), str(r.regions))
            click.echo(f"| {r.tasks or '0 (zero-shot)'} | {r.top1:.3f} | {z[0]} | {z[1]} | {z[2]} | {r.examples} "
                       f"| {r.decides} | {r.why} |")
    else:
        service = build_service(load_settings(redis_url=None, learn_min_examples=1))
        rows = examples_table(service, [int(c) for c in (counts or "0,1,3,10,30").split(",")], scenes=scenes,
                              eval_seed0=DEV_SEED0 if dev else EVAL_SEED0)
        click.echo(f"model {service.model_version}, {scenes} {kind} scenes\n")
        click.echo("| examples per label | label top-1 | instances | annotations posted |\n|---|---|---|---|")
        for r in rows:
            name = "0 (zero-shot)" if r.examples_per_label == 0 else str(r.examples_per_label)
            click.echo(f"| {name} | {r.top1:.3f} | {r.instances} | {r.annotations} |")
    write_json(json_out, [r.__dict__ for r in rows])
