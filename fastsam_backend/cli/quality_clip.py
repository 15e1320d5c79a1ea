"""``fastsam-backend quality-clip``: CLIP alone -- text and zero-shot label top-1 with ground-truth
masks -- for the configured CLIP and each of its approximations (docs/weights.md#clip-options)."""

from __future__ import annotations

from dataclasses import replace

import click

from fastsam_backend.cli.output import machine, write_json
from fastsam_backend.settings import load_settings


def variants(config, side: int, patch: int) -> list[tuple[str, object]]:
    """``(setting, ClipConfig)``: the configured CLIP first (the reference), then the exact torch
    tower and every approximation a setting selects, sized as the defaults section's are for
    ViT-B-32 at 224 (``CLIP_IMAGE_SIZE`` ~0.57 of the side, ``CLIP_DENSE_SIZE`` twice it)."""
    small = max(patch, round(side * 128 / 224 / patch) * patch)
    return [("as configured", config),
            ("CLIP_RUNTIME=torch", replace(config, runtime="torch")),
            ("CLIP_INT8=true", replace(config, int8=True)),
            (f"CLIP_IMAGE_SIZE={small}", replace(config, image_size=small)),
            (f"CLIP_IMAGE_SIZE={small} CLIP_INT8=true", replace(config, image_size=small, int8=True)),
            (f"CLIP_DENSE_SIZE={2 * side}", replace(config, dense_size=2 * side)),
            (f"CLIP_DENSE_SIZE={2 * side} CLIP_INT8=true", replace(config, dense_size=2 * side, int8=True))]


@click.command("quality-clip")
@click.option("--scenes", type=int, default=96, show_default=True, help="held-out scenes (seeds 1_000_000+)")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="write the table as JSON")
def quality_clip(scenes: int, json_out: str | None) -> None:
    """Text top-1 and zero-shot label top-1 of CLIP on held-out scenes' ground-truth masks, for the
    configured CLIP (OPEN_CLIP_MODEL / OPEN_CLIP_PRETRAINED, CLIP_* settings) and each approximation,
    with each one's agreement with the configured CLIP."""
    from fastsam_backend.logs import configure_logging
    from fastsam_backend.models.clip import ClipConfig, ClipScorer
    from fastsam_backend.quality.clip_eval import evaluate_clip, markdown
    from fastsam_backend.quality.evaluation import held_out_seeds

    configure_logging("WARNING")
    reference = ClipScorer(ClipConfig.from_settings(load_settings(redis_url=None)))
    side, patch = reference.input_grid()
    seeds = held_out_seeds(scenes)
    rows, base = [], None
    for setting, config in variants(reference.config, side, patch):
        report = evaluate_clip(reference if base is None else ClipScorer(config), seeds)
        base = base or report
        rows.append({"setting": setting, **report.summary(base)})
        click.echo(f"  {setting}: {rows[-1]}", err=True)
    click.echo(f"{scenes} held-out scenes, ground-truth masks; {machine()}\n")
    click.echo(markdown(rows))
    write_json(json_out, rows)
