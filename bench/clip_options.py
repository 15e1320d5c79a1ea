"""CLIP's levers for the ``defaults`` section: per-crop cost and agreement with the exact path.

On the crops of the run's own image (the first ``N`` masks CLIP scores), against the default
``ClipScorer`` (``exact``):

* **preprocessing**: open_clip's transform with a PIL image per crop (what the backend did) vs
  ``tensor_batch`` (what it does): time, and the max abs difference of the unit embeddings;
* **image tower**: ms per crop of the exact tower and of the opt-in approximations
  (``CLIP_INT8``, ``CLIP_IMAGE_SIZE``, both), each with its agreement with the exact embeddings
  (cosine, and how often the zero-shot label over ``labels`` is the same). With random weights the
  agreement only says how far the numbers move; the fixture suite (docs) says what that costs;
* **dense** pooling (``CLIP_DENSE_SIZE``, alone and with int8): one pass of the whole image for
  all the crops; ms per image and agreement.

``exact`` is the default: ONNX Runtime's tower on a CPU (``CLIP_RUNTIME=auto``); ``torch`` is
torch's tower, the same embeddings up to float error (its max abs difference is reported).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from .common import ratio

SEED = 0  # every scorer of a run gets the same random weights: agreement compares like with like


def load_seeded(scorer):
    """``scorer`` loaded with the run's random weights (a pretrained tag or file loads its own)."""
    import torch

    torch.manual_seed(SEED)
    scorer.load()
    return scorer


def fast_config(config, mode: str, int8: bool = True):
    """The opt-in faster CLIP measured beside the default: dense pooling from one pass of the whole
    image at twice the model's side (``CLIP_DENSE_SIZE``) + ONNX Runtime's int8 tower (CPU only)."""
    return replace(config, dense_size=96 if mode == "smoke" else 448, int8=int8)


def settings_of(config) -> str:
    return f"CLIP_DENSE_SIZE={config.dense_size} CLIP_INT8={str(config.int8).lower()}"


def before_issue(exact, image: np.ndarray, masks) -> dict[str, Any]:
    """CLIP's time on this image as the backend spent it when issue #25 was filed: every mask over
    ``CLIP_MIN_MASK_AREA`` cropped, preprocessed through PIL one crop at a time and embedded by
    torch's tower (``CLIP_RUNTIME=torch``), whatever the request could answer.

    Twice: with torch on ultralytics' ``min(8, cores - 1)`` threads, as that backend ran it (its
    first image reset torch's threads, ``segmenter.torch_threads_kept``), and on every core, as
    the issue's own per-crop figure was taken; the ratio the issue asks about uses the second."""
    import torch
    from ultralytics.utils import NUM_THREADS

    from fastsam_backend.models.clip import BATCH, ClipScorer, pil_batch, whitened_square_crop

    scorer = load_seeded(ClipScorer(replace(exact.config, runtime="torch")))
    rows = np.flatnonzero(masks.areas > exact.config.min_mask_area)

    def spend(threads: int) -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            started = time.perf_counter()
            with torch.inference_mode():
                for start in range(0, len(rows), BATCH):
                    crops = [whitened_square_crop(image, masks, int(i)) for i in rows[start:start + BATCH]]
                    scorer._encode_crops(pil_batch(scorer._preprocess, crops))
            return round(1000 * (time.perf_counter() - started), 1)
        finally:
            torch.set_num_threads(before)

    every_core = torch.get_num_threads()
    return {"crops": len(rows), "clip_ms": spend(every_core), "torch_threads": every_core,
            "clip_ms_as_it_ran": spend(NUM_THREADS), "torch_threads_as_it_ran": NUM_THREADS}


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
    options = [("torch", {"runtime": "torch"}), ("int8", {"int8": True}), (f"r{side}", {"image_size": side}),
               (f"r{side}+int8", {"image_size": side, "int8": True})]
    for name, opts in options if int8 else options[:1] + options[2:3]:
        scorer = load_seeded(ClipScorer(replace(exact.config, **opts)))
        batch = tensor_batch(crops, *scorer._input)
        with torch.inference_mode():
            t, emb = _timed(lambda scorer=scorer, batch=batch: scorer._encode_crops(batch))
        emb = _unit(emb)
        cos = (emb * ref).sum(axis=1)
        variants[name] = {"ms_per_crop": round(1000 * t / len(crops), 2), "speedup": ratio(t_exact, t),
                          "cosine_min": round(float(cos.min()), 4), "cosine_median": round(float(np.median(cos)), 4),
                          "zero_shot_label_agreement": round(float(((emb @ phrases.T).argmax(axis=1)
                                                                     == labels_ref).mean()), 4),
                          "embedding_max_abs_diff": float(np.abs(emb - ref).max())}
    out["image_tower"] = variants
    dense = 96 if mode == "smoke" else 448
    for name, opts in ((f"d{dense}", {"dense_size": dense}), (f"d{dense}+int8", {"dense_size": dense, "int8": True})):
        if "int8" in opts and not int8:
            continue
        scorer = load_seeded(ClipScorer(replace(exact.config, **opts)))
        scorer.embed_masks(image, masks[rows[:1]])  # loaded, first pass out of the figure
        t, emb = _timed(lambda scorer=scorer: scorer.embed_masks(image, masks[rows]))
        emb = _unit(emb.astype(np.float32))
        cos = (emb * ref).sum(axis=1)
        variants[name] = {"ms_per_image": round(1000 * t, 1), "ms_per_crop": round(1000 * t / len(crops), 2),
                          "speedup": ratio(t_exact, t), "cosine_min": round(float(cos.min()), 4),
                          "cosine_median": round(float(np.median(cos)), 4),
                          "zero_shot_label_agreement": round(float(((emb @ phrases.T).argmax(axis=1)
                                                                     == labels_ref).mean()), 4)}
    return out

