"""Section — the int8 CPU path: FastSAM-s cold at 1024 on torch, ONNX Runtime fp32 and int8.

The random-weight FastSAM-s checkpoint is exported with dynamic axes (as ``fastsam-backend
export-onnx``) and quantized by ``fastsam_backend.int8.quantize`` (static QDQ, calibrated on
generated scenes, head kept fp32). Each runtime is timed cold as the ``cold`` section times
torch: PNG decode + everything pass (our ``Segmenter``) + cache encoding, side by side with
MobileSAM's decode + image encoder in the same run. The mask agreement printed here is on
random weights (timing only): what int8 does to a trained model's masks is measured on the
shipped fixture (tests/test_int8.py, docs/benchmarks.md) and on yours by ``fastsam-backend compare-int8``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fastsam_backend.quality.lsrequests import png_bytes

from . import mobilesam
from .common import (
    Context,
    calibration_image,
    decode_png,
    model_for,
    ratio,
    scene_image,
    segmenter_for,
    stats_ms,
    timed,
)
from .onnx import _export

IMGSZ = 1024
TARGET = mobilesam.COLD_TARGET


def _cold(seg, png: bytes, reps: int) -> tuple[dict[str, Any], Any]:
    from fastsam_backend.core.codec import encode_entry

    seg.load()
    masks = seg.segment(decode_png(png))  # first call kept out, as in the cold section
    total, segment = [], []
    for _ in range(reps):
        t_dec, image = timed(lambda: decode_png(png))
        t_seg, masks = timed(lambda image=image: seg.segment(image))
        t_enc, _ = timed(lambda masks=masks: encode_entry(masks, None))
        total.append(t_dec + t_seg + t_enc)
        segment.append(t_seg)
    return {"total": stats_ms(total), "segment": stats_ms(segment), "instances": len(masks)}, masks


def run(ctx: Context) -> dict[str, Any]:
    if not ctx.mode.onnx_imgsz:
        return {"skipped": f"not run in {ctx.mode.name} mode"}
    from fastsam_backend.models.int8 import compare, quantize

    quick = ctx.mode.name == "quick"  # CI: keep the section under a minute
    reps = 2 if quick else max(r for arch, size, r in ctx.mode.cold_configs if arch == "s")
    calib_n = 4 if quick else 32
    image = calibration_image(ctx)
    png = png_bytes(image)
    built = model_for(ctx, "s", IMGSZ)
    ctx.log(f"  int8: export + quantize FastSAM-s arch ({calib_n} calibration scenes), cold x{reps} on 3 runtimes")
    export_s, fp32_path = _export(built.path, ctx.workdir, IMGSZ)
    int8_path = fp32_path.with_suffix(".int8.onnx")
    quant_s, _ = timed(lambda: quantize(fp32_path, int8_path, (scene_image(10 + i, ctx.mode.image_side)
                                                                for i in range(calib_n)), IMGSZ))
    runs, masks, segs = {}, {}, {}
    for name, weights in (("torch", built.path), ("onnx_fp32", fp32_path), ("onnx_int8", int8_path)):
        segs[name] = segmenter_for(replace(built, path=weights), IMGSZ, device="cpu")
        runs[name], masks[name] = _cold(segs[name], png, reps)
    mobile = mobilesam.encoder(ctx, max(1, ctx.mode.sam_reps))
    mobile_ms = mobile["decode_plus_set_image"]["p50_ms"]
    vs_mobile = {k: ratio(mobile_ms, v["total"]["p50_ms"]) for k, v in runs.items()}
    vs_torch = {k: ratio(runs["torch"]["total"]["p50_ms"], v["total"]["p50_ms"]) for k, v in runs.items()}
    agree = compare(segs["onnx_fp32"], segs["onnx_int8"], [image])["summary"]
    int8_ms = runs["onnx_int8"]["total"]["p50_ms"]
    return {"imgsz": IMGSZ, "export_s": round(export_s, 2), "quantize_s": round(quant_s, 2),
            "calibration_scenes": calib_n, "int8_file_mb": round(int8_path.stat().st_size / 2**20, 1),
            "fp32_file_mb": round(fp32_path.stat().st_size / 2**20, 1), "cold": runs,
            "mobilesam_decode_plus_encoder": mobile["decode_plus_set_image"],
            "speedup_vs_mobilesam_encoder": vs_mobile, "speedup_vs_torch": vs_torch,
            "agreement_int8_vs_fp32_random_weights": agree,
            "note": "cold = decode + everything pass + cache encoding, p50; random weights: agreement here is "
                    "not quality evidence (see docs/benchmarks.md: int8 on the trained fixture)",
            "headline": {"name": f"cold@{IMGSZ}: MobileSAM decode+encoder / FastSAM-s ONNX int8 decode+segment+encode",
                         "value": vs_mobile["onnx_int8"], "unit": "x", "target": f">= {TARGET:g}x",
                         "met": bool(vs_mobile["onnx_int8"] and vs_mobile["onnx_int8"] >= TARGET),
                         "absolute": f"MobileSAM {mobile_ms:.0f} ms; torch {runs['torch']['total']['p50_ms']:.0f} "
                                     f"({vs_mobile['torch']}x), ORT fp32 {runs['onnx_fp32']['total']['p50_ms']:.0f} "
                                     f"({vs_mobile['onnx_fp32']}x), int8 {int8_ms:.0f} ms"}}
