"""Section 1 — cold predict: what a never-seen image costs.

FastSAM: PNG decode + everything pass (our ``Segmenter``, masks decoded per box) + cache
encoding (``codec.encode_entry``), per architecture and inference size. Reference:
SAM ViT-B's image encoder (``SamPredictor.set_image`` at 1024), which a SAM
backend must run before it can answer the first click. All weights are random:
speed does not depend on weight values (see ``bench/models.py`` for how the
FastSAM instance count is made realistic).
"""

from __future__ import annotations

from typing import Any

from fastsam_backend.quality.lsrequests import png_bytes

from .common import Context, calibration_image, decode_png, model_for, ratio, segmenter_for, stats_ms, timed

SPEEDUP_TARGET = 15.0  # FastSAM-s cold at 1024 vs the SAM ViT-B encoder


def _fastsam(ctx: Context, arch: str, imgsz: int, reps: int, png: bytes) -> dict[str, Any]:
    from fastsam_backend.core.codec import encode_entry

    built = model_for(ctx, arch, imgsz)
    seg = segmenter_for(built, imgsz)
    load_s, _ = timed(seg.load)
    first_s, masks = timed(lambda: seg.segment(decode_png(png)))  # first call: fusing, allocator warm-up
    decode, segment, encode, total = [], [], [], []
    phases: dict[str, list[float]] = {}
    entry = b""
    for _ in range(reps):
        t_dec, image = timed(lambda: decode_png(png))
        t_seg, masks = timed(lambda image=image: seg.segment(image))
        t_enc, entry = timed(lambda masks=masks: encode_entry(masks, None))
        decode.append(t_dec)
        segment.append(t_seg)
        encode.append(t_enc)
        total.append(t_dec + t_seg + t_enc)
        for phase, ms in ultralytics_speed(seg).items():
            phases.setdefault(phase, []).append(ms / 1000)
    ctx.shared[("maskset", arch, imgsz)] = masks
    return {"model": built.as_dict(), "instances": len(masks), "entry_bytes": len(entry),
            "load_s": round(load_s, 3), "first_call_s": round(first_s, 3),
            "decode": stats_ms(decode), "segment": stats_ms(segment), "encode_entry": stats_ms(encode),
            "total": stats_ms(total),
            "segment_phases": _phases(phases, segment),
            "segment_phases_note": "p50 ms; ultralytics' own split (postprocess = NMS + our per-box mask "
                                   "decoding, fastsam_backend.models.boxmasks); rest = Segmenter and predictor "
                                   "overhead"}


def _phases(phases: dict[str, list[float]], segment: list[float]) -> dict[str, float]:
    out = {k: stats_ms(v)["p50_ms"] for k, v in phases.items()}
    if out:
        out["rest"] = round(stats_ms(segment)["p50_ms"] - sum(out.values()), 3)
    return out


def ultralytics_speed(seg) -> dict[str, float]:
    """ultralytics' preprocess / inference / postprocess split (ms) of the segmenter's last call, if exposed."""
    predictor = getattr(getattr(seg, "_model", None), "predictor", None)
    results = getattr(predictor, "results", None)
    speed = getattr(results[0], "speed", None) if results else None
    return {k: float(v) for k, v in speed.items() if v is not None} if isinstance(speed, dict) else {}


def _sam(ctx: Context, reps: int, png: bytes) -> dict[str, Any]:
    import torch
    from segment_anything import SamPredictor, sam_model_registry

    device = "cuda" if torch.cuda.is_available() else "cpu"  # same device as the FastSAM side ("auto")
    build_s, sam = timed(lambda: sam_model_registry["vit_b"]().eval().to(device))  # no checkpoint: random weights
    predictor = SamPredictor(sam)
    image = decode_png(png)

    def set_image() -> None:
        predictor.set_image(image)
        if device == "cuda":
            torch.cuda.synchronize()  # the embedding stays on the GPU: wait for it, as FastSAM's masks are fetched

    times, totals = [], []
    with torch.inference_mode():
        if device == "cuda":
            set_image()  # cuDNN/allocator warm-up, as FastSAM's first call is kept out of its figures
        for _ in range(reps):
            t_dec, _ = timed(lambda: decode_png(png))  # a SAM backend decodes the image too
            t, _ = timed(set_image)
            times.append(t)
            totals.append(t_dec + t)
    ctx.shared["sam_predictor"] = predictor
    ctx.shared["sam_image_shape"] = image.shape[:2]
    return {"model": "SAM ViT-B (segment-anything 1.0, random weights)", "device": device,
            "build_s": round(build_s, 3),
            "params_m": round(sum(p.numel() for p in sam.parameters()) / 1e6, 2),
            "input": f"{image.shape[1]}x{image.shape[0]} image, longest side resized to 1024",
            "set_image": stats_ms(times), "decode_plus_set_image": stats_ms(totals)}


def run(ctx: Context) -> dict[str, Any]:
    image = calibration_image(ctx)
    png = png_bytes(image)
    out: dict[str, Any] = {"image": f"{image.shape[1]}x{image.shape[0]} generated scene, PNG {len(png)} bytes",
                           "weights_note": "random weights: timing only (speed does not depend on weight values); "
                                           "the class bias is tuned so ~100 instances survive, count reported",
                           "fastsam": {}, "errors": {}}
    for arch, imgsz, reps in ctx.mode.cold_configs:
        name = f"{arch}@{imgsz}"
        ctx.log(f"  cold FastSAM-{name} x{reps}")
        try:
            out["fastsam"][name] = _fastsam(ctx, arch, imgsz, reps, png)
        except Exception as exc:  # one configuration failing must not hide the others
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
    if ctx.mode.sam_reps:
        ctx.log(f"  cold SAM ViT-B encoder x{ctx.mode.sam_reps}")
        try:
            out["sam_vit_b"] = _sam(ctx, ctx.mode.sam_reps, png)
        except Exception as exc:
            out["errors"]["sam_vit_b"] = f"{type(exc).__name__}: {exc}"
    else:
        out["sam_vit_b"] = {"skipped": f"not run in {ctx.mode.name} mode"}
    ctx.shared["cold_fastsam"] = out["fastsam"]  # the MobileSAM and int8 sections compare with it
    fast = out["fastsam"].get("s@1024")
    sam_out = out["sam_vit_b"] if isinstance(out.get("sam_vit_b"), dict) else {}
    sam, sam_total = sam_out.get("set_image"), sam_out.get("decode_plus_set_image")
    if fast and sam and sam_total:
        speedup = ratio(sam_total["p50_ms"], fast["total"]["p50_ms"])  # both from the PNG bytes
        network = ratio(sam["p50_ms"], fast.get("segment_phases", {}).get("inference", 0))
        out["speedup_network_only"] = network  # SAM encoder vs FastSAM's network pass alone (no mask postprocess)
        out["headline"] = {"name": "cold: decode+SAM ViT-B encoder / FastSAM-s@1024 decode+segment+encode",
                           "value": speedup, "unit": "x", "target": f">= {SPEEDUP_TARGET:g}x",
                           "met": speedup is not None and speedup >= SPEEDUP_TARGET,
                           "absolute": f"SAM {sam_total['p50_ms']:.0f} ms vs FastSAM-s "
                                       f"{fast['total']['p50_ms']:.0f} ms; SAM encoder vs FastSAM's network "
                                       f"pass alone: {network}x"}
    return out
