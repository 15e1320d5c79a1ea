"""CLIP's levers for the ``defaults`` section: per-crop cost and agreement with the exact path.

On the crops of the run's own image (the first ``N`` masks CLIP scores), against the default
``ClipScorer`` (``exact``):

* **preprocessing**: open_clip's transform with a PIL image per crop (what the backend did) vs
  ``tensor_batch`` (what it does): time, and the max abs difference of the unit embeddings;
* **image tower**: ms per crop of the exact tower and of the opt-in approximations
  (``CLIP_INT8``, ``CLIP_IMAGE_SIZE``, both), each with its agreement with the exact embeddings
  (cosine, and how often the zero-shot label over ``labels`` is the same). With random weights the
  agreement only says how far the numbers move; the fixture suite (docs) says what that costs;
* **ONNX Runtime** image tower (full mode only: the export takes a while): speed and max abs diff.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from .common import ratio


def fast_config(config, mode: str, int8: bool = True):
    """The opt-in faster CLIP measured beside the default: lower input side + int8 image tower
    (int8: CPU only)."""
    return replace(config, image_size=32 if mode == "smoke" else 128, int8=int8)


def settings_of(config) -> str:
    return f"CLIP_IMAGE_SIZE={config.image_size} CLIP_INT8={str(config.int8).lower()}"


def _timed(fn, reps: int = 2) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(reps):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure(exact, image: np.ndarray, masks, labels: tuple[str, ...], mode: str, int8: bool = True) -> dict[str, Any]:
    import torch

    from fastsam_backend.models.clip import ClipScorer, pil_batch, tensor_batch, whitened_square_crop

    n = {"smoke": 8, "quick": 32, "full": 64}[mode]
    rows = np.flatnonzero(masks.areas > exact.config.min_mask_area)[:n]
    crops = [whitened_square_crop(image, masks, int(i)) for i in rows]
    phrases = _unit(exact.embed_texts(list(labels)))
    out: dict[str, Any] = {"crops": len(crops), "crop_sides_px": [int(min(c.shape[0] for c in crops)),
                                                                  int(max(c.shape[0] for c in crops))] if crops else []}
    t_pil, pil = _timed(lambda: pil_batch(exact._preprocess, crops), 1)
    t_tensor, tensor = _timed(lambda: tensor_batch(crops, *exact._input), 1)
    with torch.inference_mode():
        t_exact, ref = _timed(lambda: exact._encode_crops(tensor))
        via_pil = exact._encode_crops(pil)
    ref = _unit(ref)
    out["preprocessing"] = {"pil_ms_per_crop": round(1000 * t_pil / len(crops), 2),
                            "tensor_ms_per_crop": round(1000 * t_tensor / len(crops), 2),
                            "speedup": ratio(t_pil, t_tensor),
                            "input_max_abs_diff": round(float((pil - tensor).abs().max()), 5),
                            "embedding_max_abs_diff": float(np.abs(_unit(via_pil) - ref).max())}
    labels_ref = (ref @ phrases.T).argmax(axis=1)
    variants: dict[str, Any] = {"exact": {"ms_per_crop": round(1000 * t_exact / len(crops), 2)}}
    side = 32 if mode == "smoke" else 128
    options = [("int8", {"int8": True}), (f"r{side}", {"image_size": side}),
               (f"r{side}+int8", {"image_size": side, "int8": True})]
    for name, opts in options if int8 else options[1:2]:
        scorer = ClipScorer(replace(exact.config, **opts))
        scorer.load()
        batch = tensor_batch(crops, *scorer._input)
        with torch.inference_mode():
            t, emb = _timed(lambda scorer=scorer, batch=batch: scorer._encode_crops(batch))
        emb = _unit(emb)
        cos = (emb * ref).sum(axis=1)
        variants[name] = {"ms_per_crop": round(1000 * t / len(crops), 2), "speedup": ratio(t_exact, t),
                          "cosine_min": round(float(cos.min()), 4), "cosine_median": round(float(np.median(cos)), 4),
                          "zero_shot_label_agreement": round(float(((emb @ phrases.T).argmax(axis=1)
                                                                     == labels_ref).mean()), 4)}
    out["image_tower"] = variants
    out["onnxruntime"] = _onnxruntime(exact, tensor, ref, t_exact) if mode == "full" and int8 else {
        "skipped": "full mode on a CPU only (the export takes a while)"}
    return out


def _onnxruntime(exact, batch, ref: np.ndarray, t_exact: float) -> dict[str, Any]:
    import tempfile

    import onnxruntime as ort
    import torch

    from fastsam_backend.settings import available_cores

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/visual.onnx"
        started = time.perf_counter()
        torch.onnx.export(exact._model.visual, (batch[:2],), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17, dynamo=False)
        export_s = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = available_cores()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        x = batch.numpy()
        t, emb = _timed(lambda: session.run(None, {"x": x})[0])
    proj = exact._model.visual
    emb = _unit(emb)
    return {"export_s": round(export_s, 1), "ms_per_crop": round(1000 * t / len(x), 2), "speedup": ratio(t_exact, t),
            "embedding_max_abs_diff": float(np.abs(emb - ref).max()), "note": f"image tower {type(proj).__name__}"}
