"""``fastsam-backend quality-labels``: label top-1 against annotated examples per label (docs/learned-labels.md)."""

from __future__ import annotations

import json

import click

from fastsam_backend.settings import load_settings


@click.command("quality-labels")
@click.option("--scenes", type=int, default=40, show_default=True, help="held-out scenes pre-annotated per count")
@click.option("--counts", default="0,1,3,10,30", show_default=True, help="examples per label (0 = zero-shot)")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="write the rows as JSON")
@click.option("--dev", is_flag=True, help="pre-annotate development scenes, not the held-out ones (for tuning)")
def quality_labels(scenes: int, counts: str, json_out: str | None, dev: bool) -> None:
    """Label top-1 of pre-annotated instances vs annotated examples per label, through the webhook and
    /predict paths (embedded cache; each count its own project; LEARN_MIN_EXAMPLES is set to 1 so every
    count uses its examples)."""
    from fastsam_backend.logs import configure_logging
    from fastsam_backend.quality.labels_learned import DEV_SEED0, EVAL_SEED0, examples_table
    from fastsam_backend.service.orchestrator import build_service

    settings = load_settings(redis_url=None, learn_min_examples=1)
    configure_logging("WARNING")
    service = build_service(settings)
    rows = examples_table(service, [int(c) for c in counts.split(",")], scenes=scenes,
                          eval_seed0=DEV_SEED0 if dev else EVAL_SEED0)
    click.echo(f"model {service.model_version}, {scenes} {'development' if dev else 'held-out'} scenes\n")
    click.echo("| examples per label | label top-1 | instances | annotations posted |\n|---|---|---|---|")
    for r in rows:
        name = "0 (zero-shot)" if r.examples_per_label == 0 else str(r.examples_per_label)
        click.echo(f"| {name} | {r.top1:.3f} | {r.instances} | {r.annotations} |")
    if json_out:
        with open(json_out, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=2)
