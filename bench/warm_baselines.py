"""The warm-click references: what answering one click costs without our cache.

(a) ultralytics' ``FastSAM.predict`` with the point/box prompt (its predictor runs
the everything pass, then ``FastSAMPredictor.prompt``) on every click — a backend
that keeps no masks; (b) SAM ViT-B's ``SamPredictor.predict`` (prompt encoder +
mask decoder) per click on an image embedding computed once by ``set_image``.
Both run in-process, so they carry no HTTP or JSON cost: a conservative reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import CONF, IOU, MAX_DET, Context, stats_ms, timed


def sam_prompt_call(predictor, kind: str, coords, *, multimask_clicks: bool):
    """One prompt for a ``SamPredictor`` as a no-argument call: a positive click or a box."""
    if kind == "click":
        return lambda: predictor.predict(point_coords=np.array([coords]), point_labels=np.array([1]),
                                         multimask_output=multimask_clicks)
    return lambda: predictor.predict(box=np.array(coords), multimask_output=False)


def _pixel_prompts(inputs: dict[str, Any], n: int) -> list[tuple[str, list[float]]]:
    """The first ``n`` prompts of the HTTP run, in pixels: ("click", [x, y]) or ("box", [x0, y0, x1, y1])."""
    h, w = inputs["masks"].image_size
    out = []
    for kind, region in inputs["prompts"][:n]:
        v = region["value"]
        if kind == "click":
            out.append((kind, [int(v["x"] / 100 * w), int(v["y"] / 100 * h)]))
        else:
            x0, y0 = v["x"] / 100 * w, v["y"] / 100 * h
            out.append((kind, [x0, y0, x0 + v["width"] / 100 * w, y0 + v["height"] / 100 * h]))
    return out


def fastsam_per_click(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    n = ctx.mode.nocache_clicks
    if n <= 0:
        return {"skipped": f"not run in {ctx.mode.name} mode"}
    from ultralytics import FastSAM

    model = FastSAM(str(inputs["built"].path))
    bgr = np.ascontiguousarray(inputs["image"][:, :, ::-1])
    kwargs = {"retina_masks": True, "imgsz": ctx.mode.warm_imgsz, "conf": CONF, "iou": IOU, "max_det": MAX_DET,
              "device": "cpu", "verbose": False}
    model.predict(bgr, **kwargs)  # load + warm-up, not counted
    times = []
    for kind, coords in _pixel_prompts(inputs, n):
        prompt = {"points": [coords], "labels": [1]} if kind == "click" else {"bboxes": [coords]}
        t, _ = timed(lambda prompt=prompt: model.predict(bgr, **prompt, **kwargs))
        times.append(t)
    return {"what": "ultralytics FastSAM.predict(points=/bboxes=) per prompt: everything pass + prompt, no cache",
            "per_click": stats_ms(times)}


def sam_per_click(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    n = ctx.mode.sam_clicks
    if n <= 0:
        return {"skipped": f"not run in {ctx.mode.name} mode"}
    import torch

    predictor = ctx.shared.get("sam_predictor")
    set_image_s = None
    if predictor is None or ctx.shared.get("sam_image_shape") != inputs["image"].shape[:2]:
        from segment_anything import SamPredictor, sam_model_registry

        predictor = SamPredictor(sam_model_registry["vit_b"]().eval())
        with torch.inference_mode():
            set_image_s, _ = timed(lambda: predictor.set_image(inputs["image"]))
    times = []
    with torch.inference_mode():
        for kind, coords in _pixel_prompts(inputs, n):
            t, _ = timed(sam_prompt_call(predictor, kind, coords, multimask_clicks=True))
            times.append(t)
    out = {"what": "SAM ViT-B SamPredictor.predict per prompt (prompt encoder + mask decoder + upscaling), "
                   "embedding cached by set_image", "per_click": stats_ms(times)}
    if set_image_s is not None:
        out["set_image_s"] = round(set_image_s, 3)
    return out
