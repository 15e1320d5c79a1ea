"""``fastsam-backend compare-int8``: does int8 ONNX Runtime keep *your* model's masks?

Exports the weights to ONNX (dynamic axes) when given a ``.pt``, quantizes the export
(``fastsam_backend.int8``), segments your images with both and prints how the int8 masks
match the fp32 ones. Exit status 0 when every fp32 instance is found again with mask IoU
>= 0.98, 1 otherwise. The int8 file is left beside the export; its content digest is part of
``model_version``, so serving it (``FASTSAM_WEIGHTS=<file>.int8.onnx``) never reuses fp32 cache entries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from fastsam_backend.settings import load_settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
CALIBRATION_SEEDS = range(10, 42)  # generated scenes (training seed range) when no --calibration folder


def _images(folder: str | None, limit: int) -> list[np.ndarray]:
    from PIL import Image

    if folder is None:
        return []
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise click.UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


@click.command("compare-int8")
@click.option("--weights", default=None, help="FastSAM .pt or fp32 .onnx export [env FASTSAM_WEIGHTS]")
@click.option("--images", "images_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="your images to compare on (default: 20 generated held-out scenes)")
@click.option("--calibration", "calibration_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="images to calibrate the int8 ranges on (default: --images, else 32 generated scenes)")
@click.option("--imgsz", type=int, default=None, help="inference size [env IMGSZ]")
@click.option("--limit", type=int, default=50, show_default=True, help="at most this many images per folder")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="write the figures as JSON")
def compare_int8(weights: str | None, images_dir: str | None, calibration_dir: str | None, imgsz: int | None,
                 limit: int, json_out: str | None) -> None:
    """Quantize FastSAM to int8 for ONNX Runtime and compare its masks with fp32 on your images."""
    from fastsam_backend.models.int8 import MASK_IOU_BAR, compare, quantize
    from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig
    from fastsam_backend.quality.scenes import generate_scene

    overrides = {k: v for k, v in {"fastsam_weights": weights, "imgsz": imgsz}.items() if v is not None}
    settings = load_settings(**overrides)
    config = SegmenterConfig.from_settings(settings)
    fp32_path = Path(config.weights)
    if fp32_path.suffix != ".onnx":
        click.echo(f"exporting {config.weights} to ONNX (dynamic axes) ...", err=True)
        fp32_path = Segmenter(config).export_onnx()
    images = _images(images_dir, limit) or [generate_scene(1_000_000 + i).image for i in range(20)]
    calibration = _images(calibration_dir, limit) if calibration_dir else (
        images if images_dir else [generate_scene(s, (config.imgsz, config.imgsz)).image for s in CALIBRATION_SEEDS])
    int8_path = fp32_path.with_suffix(".int8.onnx")
    click.echo(f"quantizing {fp32_path} on {len(calibration)} calibration images ...", err=True)
    quantize(fp32_path, int8_path, calibration, config.imgsz)
    segmenters = [Segmenter(SegmenterConfig(**{**config.__dict__, "weights": str(p)})) for p in (fp32_path, int8_path)]
    result = compare(*segmenters, images)
    s = result["summary"]
    click.echo(f"\nfp32 {fp32_path.name} vs int8 {int8_path.name}, IMGSZ {config.imgsz}, {s['images']} images "
               f"({'yours' if images_dir else 'generated scenes'})\n")
    click.echo("| figure | value |\n|---|---|")
    for key in ("fp32_instances", "int8_instances", "matched", "lost", "mask_iou_min", "mask_iou_median",
                f"share_iou_ge_{MASK_IOU_BAR}"):
        click.echo(f"| {key} | {s[key]} |")
    verdict = "holds" if s["holds"] else "does NOT hold"
    click.echo(f"\nint8 {verdict}: every fp32 instance matched with mask IoU >= {MASK_IOU_BAR} "
               f"({'serve it with' if s['holds'] else 'keep'} FASTSAM_WEIGHTS="
               f"{int8_path if s['holds'] else fp32_path})")
    if json_out:
        Path(json_out).write_text(json.dumps({"fp32": str(fp32_path), "int8": str(int8_path), **result}, indent=2))
    sys.exit(0 if s["holds"] else 1)
