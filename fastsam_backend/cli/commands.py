"""``fastsam-backend`` / ``python -m fastsam_backend``: serve, quality, export-onnx, and the job
queues' worker, warm and preannotate (``cli/jobs.py``).

The benchmarks live in the repository, not in the wheel: ``fastsam-backend bench`` runs a checkout's
``python -m bench`` (an editable install), and says so where there is none.
"""

from __future__ import annotations

import os
import sys
import tempfile

import click

from fastsam_backend.cli.exemplars import quality_exemplars
from fastsam_backend.cli.int8 import compare_int8
from fastsam_backend.cli.jobs import preannotate, warm, worker
from fastsam_backend.cli.learn import quality_labels
from fastsam_backend.cli.output import write_json
from fastsam_backend.cli.quality_clip import quality_clip
from fastsam_backend.cli.train import train
from fastsam_backend.logs import configure_logging
from fastsam_backend.settings import load_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """FastSAM backend for Label Studio."""


@main.command()
@click.option("--host", default=None, help="bind address [env BIND_HOST, default 0.0.0.0]")
@click.option("--port", type=int, default=None, help="[env PORT, default 9090]")
@click.option("--workers", type=int, default=None, help="gunicorn processes [env WORKERS, default 1]")
@click.option("--threads", type=int, default=None, help="threads per worker [env THREADS, default 4]")
def serve(host: str | None, port: int | None, workers: int | None, threads: int | None) -> None:
    """Run the backend under gunicorn (the app factory fastsam_backend.server:create_app)."""
    from gunicorn.app.base import BaseApplication

    overrides = {k: v for k, v in {"bind_host": host, "port": port, "workers": workers, "threads": threads}.items()
                 if v is not None}
    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # metrics of all workers, summed (set before fork so every worker writes there)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fastsam-metrics-")

    class Application(BaseApplication):
        def load_config(self) -> None:
            cfg = {
                "bind": f"{settings.bind_host}:{settings.port}",
                "workers": settings.workers,
                "threads": settings.threads,
                "worker_class": "gthread",
                "timeout": settings.timeout_s,
                "graceful_timeout": 30,
                "accesslog": None,
                "loglevel": settings.log_level.lower(),
                "child_exit": _child_exit,
                "control_socket_disable": True,  # several instances on one host would share its path
            }
            for key, value in cfg.items():
                self.cfg.set(key, value)

        def load(self):
            from fastsam_backend.server import create_app

            return create_app(settings)

    Application().run()


@main.command()
@click.option("--scenes", type=int, default=40, show_default=True, help="held-out scenes (seeds 1_000_000+)")
@click.option("--weights", default=None, help="FastSAM checkpoint [env FASTSAM_WEIGHTS]")
@click.option("--imgsz", type=int, default=None, help="inference size [env IMGSZ]")
@click.option("--rules/--no-rules", default=True, help="also compare the point rules")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="write the figures as JSON")
@click.option("--compare", is_flag=True, help="instead: every box and point rule per case type, on the ordinary "
              "and the hard suite, and polygon vs brush answers (issue #15)")
@click.option("--hard-scenes", type=int, default=None, help="hard scenes for --compare [default: --scenes]")
@click.option("--dev", is_flag=True, help="--compare on development seeds (500,000+ and 2,000,000+), not held-out")
def quality(scenes: int, weights: str | None, imgsz: int | None, rules: bool, json_out: str | None,
            compare: bool, hard_scenes: int | None, dev: bool) -> None:
    """Mask quality on generated held-out scenes, through the backend's own request path."""

    from fastsam_backend.errors import ModelUnavailable
    from fastsam_backend.quality.evaluation import compare_point_rules, evaluate, held_out_seeds
    from fastsam_backend.service.orchestrator import build_service

    overrides = {k: v for k, v in {"fastsam_weights": weights, "imgsz": imgsz}.items() if v is not None}
    settings = load_settings(**overrides)
    configure_logging("WARNING")
    service = build_service(settings)
    if compare:
        result = _compare(service, scenes, scenes if hard_scenes is None else hard_scenes, dev)
        write_json(json_out, result)
        return
    text = False
    if service.clip is not None:
        try:
            service.clip.load()
            text = True
        except ModelUnavailable as exc:
            click.echo(f"text check skipped: {exc.message}", err=True)
    seeds = held_out_seeds(scenes)
    summary = evaluate(service, seeds, text=text).summary()
    click.echo(f"model {service.model_version}, {scenes} held-out scenes\n")
    click.echo("| check | mean | n |\n|---|---|---|")
    rows = [("one positive click per object: IoU", "point_miou", "point_n"),
            ("box = ground-truth box: IoU", "box_miou", "box_n"),
            ("positive + negative click, overlapping pair: IoU", "pos_neg_miou", "pos_neg_n"),
            ("everything mode: recall at IoU 0.5", "everything_recall50", "everything_n")]
    if text:
        rows.append(("text naming exactly one segmented object: top-1", "text_top1", "text_n"))
    for name, key, n in rows:
        click.echo(f"| {name} | {summary[key]:.3f} | {summary[n]} |")
    if text:
        click.echo(f"\n(text: {summary['text_unsegmented']} more single-match objects were not segmented)")
    result = {"model_version": service.model_version, "summary": summary}
    if rules:
        table = compare_point_rules(service, seeds)
        click.echo("\n| point rule | click IoU | pos+neg IoU |\n|---|---|---|")
        for rule, row in table.items():
            click.echo(f"| {rule} | {row['point_miou']:.3f} | {row['pos_neg_miou']:.3f} |")
        result["point_rules"] = table
    write_json(json_out, result)


def _compare(service, scenes: int, hard_scenes: int, dev: bool) -> dict:
    """``quality --compare``: prints the tables, returns the figures."""
    from fastsam_backend.quality.comparison import compare_rules, markdown
    from fastsam_backend.quality.evaluation import held_out_seeds
    from fastsam_backend.quality.hardscenes import dev_seeds, generate_hard_scene, held_out_hard_seeds
    from fastsam_backend.quality.scenes import generate_scene

    kind = "development" if dev else "held-out"
    old_seeds = [500_000 + i for i in range(scenes)] if dev else held_out_seeds(scenes)
    hard_seeds = dev_seeds(hard_scenes) if dev else held_out_hard_seeds(hard_scenes)
    click.echo(f"model {service.model_version}; {kind} seeds from {old_seeds[:1]} and {hard_seeds[:1]}")
    result = {"model_version": service.model_version, "seeds": kind}
    for name, seeds, scene_of in (("ordinary", old_seeds, generate_scene), ("hard", hard_seeds, generate_hard_scene)):
        if seeds:
            comparison = compare_rules(service, seeds, scene_of)
            click.echo(markdown(comparison, f"{name} suite, {len(seeds)} {kind} scenes"))
            result[name] = comparison.as_json()
    return result


@main.command("export-onnx")
@click.option("--weights", default=None, help="checkpoint to export [env FASTSAM_WEIGHTS]")
@click.option("--imgsz", type=int, default=None, help="trace size of the export [env IMGSZ, default 1024]")
def export_onnx(weights: str | None, imgsz: int | None) -> None:
    """Export FastSAM weights to ONNX for ONNX Runtime on CPU (then point FASTSAM_WEIGHTS at the file).

    Needs the `onnx` and `onnxslim` packages (requirements-dev.txt) where it runs; serving needs
    only `onnxruntime`. The export has dynamic axes, so it serves any IMGSZ.
    """
    from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig

    overrides = {k: v for k, v in {"fastsam_weights": weights, "imgsz": imgsz}.items() if v is not None}
    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    path = Segmenter(SegmenterConfig.from_settings(settings)).export_onnx()
    click.echo(f"exported {path}; serve it with FASTSAM_WEIGHTS={path}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """The benchmarks: ``python -m bench ARGS`` of this checkout (``fastsam-backend bench --help``)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]  # the checkout: fastsam_backend/cli/commands.py
    if not (root / "bench" / "__main__.py").is_file():
        raise click.ClickException("the benchmarks live in the repository, not in the installed package: "
                                   "install a checkout with `pip install -e .` (or `make run`) and run "
                                   "`fastsam-backend bench` there, or `python -m bench` in the checkout")
    sys.exit(subprocess.call([sys.executable, "-m", "bench", *ctx.args], cwd=root))


def _child_exit(server, worker) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


for _command in (worker, warm, preannotate, compare_int8, quality_labels, quality_exemplars, quality_clip, train):
    main.add_command(_command)

if __name__ == "__main__":
    main()
