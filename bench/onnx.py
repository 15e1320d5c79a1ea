"""Section 6 — CPU acceleration: ultralytics' ONNX export run by onnxruntime vs torch.

The same random-weight FastSAM-s checkpoint is exported offline with dynamic axes
(``YOLO(pt).export(format="onnx", dynamic=True)``, as ``fastsam-backend export-onnx``;
needs ``onnx`` + ``onnxslim`` + ``onnxruntime``)
and both are run through our ``Segmenter`` (ultralytics' AutoBackend loads either).
OpenVINO (issue #6: "if it installs here") is measured the same way where the package is
installed (requirements-dev.txt). Reported: the speed ratio of the everything pass and the mask agreement — each
torch instance matched to the ONNX instance with the highest box IoU, then the
pixel IoU of their masks (target >= 0.99 for every matched instance).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Any

import numpy as np

from fastsam_backend.core.boxmatch import box_box_ious
from fastsam_backend.core.masks import crop_iou

from .cold import ultralytics_speed
from .common import IOU, MAX_DET, Context, calibration_image, model_for, ratio, segmenter_for, stats_ms, timed

IOU_TARGET = 0.99


def _export(pt_path, workdir, imgsz: int, fmt: str = "onnx"):
    from ultralytics import YOLO

    target = workdir / fmt / pt_path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(pt_path, target)
    # dynamic axes, as `fastsam-backend export-onnx` makes them (torch's letterbox: same masks on any aspect)
    seconds, path = timed(lambda: YOLO(str(target)).export(format=fmt, imgsz=imgsz, dynamic=True, device="cpu",
                                                           verbose=False))
    return seconds, type(target)(path)


def _openvino(ctx: Context, built, image, torch_masks, torch_p50_ms: float) -> dict[str, Any]:
    """The same comparison for OpenVINO (optional: only where the package is installed)."""
    try:
        import openvino
    except ImportError:
        return {"skipped": "openvino is not installed"}
    from ultralytics import FastSAM

    from fastsam_backend.models.segmenter import box_mask_predictor

    export_s, folder = _export(built.path, ctx.workdir, built.imgsz, fmt="openvino")
    model = FastSAM(str(folder))  # a folder, which our Segmenter does not take: driven as it drives a model
    bgr = np.ascontiguousarray(image[:, :, ::-1])

    def segment():
        return model.predict(bgr, predictor=box_mask_predictor(), imgsz=built.imgsz, conf=built.conf, iou=IOU,
                             max_det=MAX_DET, device="cpu", verbose=False)[0].instance_masks

    masks = segment()
    times = [timed(segment)[0] for _ in range(ctx.mode.onnx_reps)]
    agree = agreement(torch_masks, masks)
    return {"openvino": openvino.__version__, "export_s": round(export_s, 2), "segment": stats_ms(times),
            "speedup_vs_torch": ratio(torch_p50_ms, stats_ms(times)["p50_ms"]), "agreement": agree}


def agreement(ref, other) -> dict[str, Any]:
    """Per reference instance: best box match in ``other`` and the pixel IoU of the two masks."""
    ious = []
    for i in range(len(ref)):
        if not len(other):
            break
        j = int(np.argmax(box_box_ious(other, tuple(int(v) for v in ref.boxes[i]))))
        ious.append(crop_iou(ref.boxes[i], ref.crops[i], other.boxes[j], other.crops[j]))
    arr = np.asarray(ious)
    return {"torch_instances": len(ref), "onnx_instances": len(other), "matched": int(arr.size),
            "mask_iou_min": round(float(arr.min()), 4) if arr.size else None,
            "mask_iou_median": round(float(np.median(arr)), 4) if arr.size else None,
            "share_iou_ge_0.99": round(float((arr >= IOU_TARGET).mean()), 4) if arr.size else None}


def run(ctx: Context) -> dict[str, Any]:
    imgsz = ctx.mode.onnx_imgsz
    if not imgsz:
        return {"skipped": f"not run in {ctx.mode.name} mode"}
    import onnxruntime

    image = calibration_image(ctx)
    built = model_for(ctx, "s", imgsz)
    ctx.log(f"  onnx: exporting FastSAM-s arch at imgsz {imgsz}")
    export_s, onnx_path = _export(built.path, ctx.workdir, imgsz)
    results: dict[str, Any] = {}
    masksets = {}
    for name, weights in (("torch", built.path), ("onnxruntime", onnx_path)):
        seg = segmenter_for(replace(built, path=weights), imgsz, device="cpu")
        seg.load()
        masksets[name] = seg.segment(image)  # warm-up, and the masks compared below
        times, phases = [], {}
        for _ in range(ctx.mode.onnx_reps):
            times.append(timed(lambda seg=seg: seg.segment(image))[0])
            for phase, ms in ultralytics_speed(seg).items():
                phases.setdefault(phase, []).append(ms / 1000)
        results[name] = {"segment": stats_ms(times), "instances": len(masksets[name]),
                         "phases_p50_ms": {k: stats_ms(v)["p50_ms"] for k, v in phases.items()}}
    try:
        results["openvino"] = _openvino(ctx, built, image, masksets["torch"], results["torch"]["segment"]["p50_ms"])
    except Exception as exc:  # optional runtime: record and go on
        results["openvino"] = {"error": f"{type(exc).__name__}: {exc}"}
    agree = agreement(masksets["torch"], masksets["onnxruntime"])
    speedup = ratio(results["torch"]["segment"]["p50_ms"], results["onnxruntime"]["segment"]["p50_ms"])
    network = ratio(results["torch"]["phases_p50_ms"].get("inference", 0),
                    results["onnxruntime"]["phases_p50_ms"].get("inference", 0))
    met = agree["mask_iou_min"] is not None and agree["mask_iou_min"] >= IOU_TARGET
    return {"export_s": round(export_s, 2), "onnx_file_mb": round(onnx_path.stat().st_size / 2**20, 1),
            "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
            "imgsz": imgsz, "runs": results, "agreement": agree, "speedup_onnx_vs_torch": speedup,
            "speedup_onnx_vs_torch_network_only": network,
            "headline": {"name": f"ONNX Runtime vs torch, everything pass FastSAM-s@{imgsz}", "value": speedup,
                         "unit": "x", "target": f"report; masks IoU >= {IOU_TARGET} per matched instance",
                         "met": met, "absolute": f"torch {results['torch']['segment']['p50_ms']:.0f} ms, ORT "
                         f"{results['onnxruntime']['segment']['p50_ms']:.0f} ms (network only: {network}x); "
                         f"min mask IoU {agree['mask_iou_min']}"
                         f", {agree['onnx_instances']}/{agree['torch_instances']} instances"}}
