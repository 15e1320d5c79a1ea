"""``fastsam-backend quality-exemplars``: exemplar prompts' precision, recall and F1 (docs/exemplars.md)."""

from __future__ import annotations

import click

from fastsam_backend.cli.output import machine, write_json
from fastsam_backend.settings import load_settings


@click.command("quality-exemplars")
@click.option("--scenes", type=int, default=24, show_default=True, help="scenes with a repeated kind")
@click.option("--dev", is_flag=True, help="development scenes, not the held-out ones (for tuning)")
@click.option("--no-clip", is_flag=True, help="CLIP_ENABLED=false: geometry and colour alone")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="write the table as JSON")
def quality_exemplars(scenes: int, dev: bool, no_clip: bool, json_out: str | None) -> None:
    """One exemplar box, one exemplar click and two exemplar boxes on one object of a repeated kind,
    scored against every object of that kind (IoU >= 0.5), with the text prompt "all <colour> <shape>s"
    beside them (embedded cache)."""
    from fastsam_backend.logs import configure_logging
    from fastsam_backend.quality.exemplar_eval import MODES, evaluate_exemplars, markdown
    from fastsam_backend.quality.exemplar_scenes import dev_seeds, heldout_seeds
    from fastsam_backend.service.orchestrator import build_service

    overrides: dict[str, object] = {"redis_url": None}
    if no_clip:
        overrides["clip_enabled"] = False
    settings = load_settings(**overrides)
    configure_logging("WARNING")
    service = build_service(settings)
    cues = service.models.state()["exemplar_cues"]
    modes = MODES if service.models.zero_shot_unavailable() is None else MODES[:-1]
    seeds = dev_seeds(scenes) if dev else heldout_seeds(scenes)
    table = evaluate_exemplars(service, seeds, modes)
    click.echo(f"model {service.model_version}, {scenes} {'development' if dev else 'held-out'} scenes, "
               f"cues: {cues}; {machine()}\n")
    click.echo(markdown(table))
    write_json(json_out, table)
