"""Section — MobileSAM, the peer Label Studio users run on a CPU (the SAM backend's default).

MobileSAM is TinyViT (ultralytics' ``build_mobile_sam``, random init: its weights cannot be
downloaded here) in front of SAM's own prompt encoder and mask decoder (segment-anything's
modules, as the ``mobile_sam`` package builds it), driven by ``SamPredictor`` as the SAM
backend drives it:

* **cold**: PNG decode + ``set_image`` (TinyViT image encoder at 1024);
* **per click**: ``predict`` (prompt encoder + mask decoder + upsampling of the low-res logits
  to the original size + threshold) + the label-studio-sdk's ``mask2rle`` of the chosen mask,
  what its backend sends back. Same prompts as the warm HTTP run.

SAM ViT-B (``cold`` and ``warm`` sections) stays beside it. Headline ratios here are against
MobileSAM: FastSAM-s@1024 cold (``cold`` section) and the warm click over HTTP (``warm``),
both from the same run. Random weights: timing only, never quality.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastsam_backend.quality.lsrequests import png_bytes

from .common import Context, calibration_image, decode_png, ratio, stats_ms, timed

COLD_TARGET = 3.0  # FastSAM cold at 1024 against MobileSAM's encoder (issue #16, with the int8 path)


def mobile_sam():
    """A ``SamPredictor`` over MobileSAM's architecture (TinyViT + SAM prompt encoder / decoder), random init."""
    import torch
    from segment_anything import SamPredictor
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    from ultralytics.models.sam.build import build_mobile_sam

    torch.manual_seed(0)
    encoder = build_mobile_sam().image_encoder  # TinyViT-5M, 1024 input, (B, 256, 64, 64) out
    sam = Sam(image_encoder=encoder,
              prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                           mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                  depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
                  iou_head_hidden_dim=256),
              pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()
    return SamPredictor(sam), round(sum(p.numel() for p in sam.parameters()) / 1e6, 2)


def encoder(ctx: Context, reps: int) -> dict[str, Any]:
    """MobileSAM cold on the calibration image (memoized per run: the int8 section compares with it)."""
    if "mobilesam_cold" in ctx.shared:
        return ctx.shared["mobilesam_cold"]
    import torch

    png = png_bytes(calibration_image(ctx))
    build_s, (predictor, params_m) = timed(mobile_sam)
    image = decode_png(png)
    set_image, totals = [], []
    with torch.inference_mode():
        predictor.set_image(image)  # first call (allocator warm-up), as FastSAM's is kept out
        for _ in range(reps):
            t_dec, image = timed(lambda: decode_png(png))
            t, _ = timed(lambda image=image: predictor.set_image(image))
            set_image.append(t)
            totals.append(t_dec + t)
    out = {"model": "MobileSAM arch (ultralytics TinyViT + segment-anything prompt encoder / mask decoder), random "
                    "weights", "params_m": params_m, "build_s": round(build_s, 2),
           "input": f"{image.shape[1]}x{image.shape[0]}, longest side resized to 1024",
           "set_image": stats_ms(set_image), "decode_plus_set_image": stats_ms(totals), "predictor": predictor,
           "torch_threads": torch.get_num_threads()}
    ctx.shared["mobilesam_cold"] = out
    return out


def _object_mask(masks, kind: str, coords: list[float]) -> np.ndarray | None:
    """The object a trained model would return for the prompt: ours for it (``(H, W)`` bool)."""
    from fastsam_backend.core.selection import select_by_box, select_by_points

    if kind == "click":
        sel = select_by_points(masks, np.array([coords], np.int64), np.ones(1, bool))
    else:
        sel = select_by_box(masks, tuple(int(v) for v in coords))
    return None if sel is None else sel.mask


def per_click(ctx: Context, predictor, n: int) -> dict[str, Any]:
    """``SamPredictor.predict`` + the SDK's ``mask2rle`` per prompt, on the warm run's prompts.

    The RLE is timed on the object mask our backend picks for the same prompt: its cost grows
    with the runs in the mask, and random weights give MobileSAM speckled half-image masks (the
    SDK took 0.4 s on those) where a trained one returns the object."""
    import torch
    from label_studio_sdk.converter.brush import mask2rle

    from .warm import prepare
    from .warm_baselines import _pixel_prompts, sam_prompt_call

    inputs = prepare(ctx)
    decode, rle, total = [], [], []
    with torch.inference_mode():
        for kind, coords in _pixel_prompts(inputs, n):
            t_dec, (masks, _, _) = timed(sam_prompt_call(predictor, kind, coords, multimask_clicks=False))
            obj = _object_mask(inputs["masks"], kind, coords)
            mask = obj if obj is not None else masks[0]
            t_rle, _ = timed(lambda m=mask: mask2rle(m.astype(np.uint8) * 255))
            decode.append(t_dec)
            rle.append(t_rle)
            total.append(t_dec + t_rle)
    return {"what": "SamPredictor.predict (prompt encoder + mask decoder + upsampling to the original size) + "
                    "label-studio-sdk mask2rle (of the object mask our backend picks for the prompt), per prompt",
            "predict": stats_ms(decode), "sdk_rle": stats_ms(rle),
            "per_click": stats_ms(total)}


def run(ctx: Context) -> dict[str, Any]:
    reps, clicks = ctx.mode.sam_reps, ctx.mode.sam_clicks
    if not reps:
        return {"skipped": f"not run in {ctx.mode.name} mode"}
    ctx.log(f"  MobileSAM encoder x{reps}, {clicks} clicks")
    cold = encoder(ctx, reps)
    out: dict[str, Any] = {"cold": {k: v for k, v in cold.items() if k != "predictor"}}
    out["click"] = per_click(ctx, cold["predictor"], clicks)
    mobile_cold, mobile_click = cold["decode_plus_set_image"]["p50_ms"], out["click"]["per_click"]
    fast = ctx.shared.get("cold_fastsam", {}).get("s@1024")
    warm = ctx.shared.get("warm_http")
    vs: dict[str, Any] = {}
    if fast:
        vs["cold_torch_fastsam_s1024"] = ratio(mobile_cold, fast["total"]["p50_ms"])
    if warm:
        vs["click_p50_over_http"] = ratio(mobile_click["p50_ms"], warm["latency"]["p50_ms"])
        vs["click_p95_over_http"] = ratio(mobile_click["p95_ms"], warm["latency"]["p95_ms"])
    out["fastsam_speedup_vs_mobilesam"] = vs
    out["note"] = ("ratios are MobileSAM / ours, same run: cold = decode + encoder vs decode + FastSAM-s@1024 + cache "
                   "encoding (torch); click = in-process predict + SDK RLE vs our whole HTTP round trip")
    if vs.get("click_p50_over_http"):
        out["headline"] = {"name": "warm click: MobileSAM predict+RLE (in-process) / ours over HTTP, p50",
                           "value": vs["click_p50_over_http"], "unit": "x", "target": "report", "met": None,
                           "absolute": f"MobileSAM click p50 {mobile_click['p50_ms']:.0f} / p95 "
                                       f"{mobile_click['p95_ms']:.0f} ms; decode + encoder {mobile_cold:.0f} ms"
                                       + (f" (torch FastSAM-s@1024 cold: {vs['cold_torch_fastsam_s1024']}x faster)"
                                          if vs.get("cold_torch_fastsam_s1024") else "")}
    return out
