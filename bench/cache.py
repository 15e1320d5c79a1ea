"""Section 4 — cache: how big a cached image is and what (de)serializing it costs.

Two mask sets: the random-weight FastSAM-s masks of the warm image (smooth blobs,
~100 instances) and ~100 ground-truth object masks of generated scenes (real
object shapes). Each is compared with raw boolean masks (``N*H*W`` bytes). Redis
memory for 1,000 cached images is extrapolated from ``MEMORY USAGE`` (and the
``INFO memory`` delta) of a sample of entries written under a private prefix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import CALIBRATION_SEED, TARGET_INSTANCES, Context, stats_ms, timed
from .servers import redis_prefix

RATIO_TARGET = 20.0  # raw / encoded


def _scene_masks(side: int, want: int):
    """At least ``want`` ground-truth object masks from generated scenes (bounded: 200 scenes)."""
    from fastsam_backend.core.masks import MaskSet
    from fastsam_backend.quality.scenes import generate_scene

    dense = []
    for seed in range(CALIBRATION_SEED + 100, CALIBRATION_SEED + 300):
        dense.extend(o.mask for o in generate_scene(seed, (side, side)).objects)
        if len(dense) >= want:
            break
    return MaskSet.from_dense(np.stack(dense[:want]), np.linspace(0.9, 0.4, min(want, len(dense))))


def _model_masks(ctx: Context):
    inputs = ctx.shared.get("warm_inputs")
    if inputs is not None:
        return inputs["masks"]
    found = [v for k, v in ctx.shared.items() if isinstance(k, tuple) and k[0] == "maskset" and len(v)]
    return max(found, key=lambda m: m.image_size[0] * m.image_size[1]) if found else None


def _codec(masks, reps: int) -> dict[str, Any]:
    from fastsam_backend.core.codec import decode_entry, encode_entry

    enc, dec, entry = [], [], b""
    for _ in range(reps):
        t, entry = timed(lambda: encode_entry(masks, None))
        enc.append(t)
        t, _ = timed(lambda entry=entry: decode_entry(entry))
        dec.append(t)
    h, w = masks.image_size
    raw = len(masks) * h * w
    return {"instances": len(masks), "image": f"{w}x{h}", "raw_bool_bytes": raw, "entry_bytes": len(entry),
            "raw_over_entry": round(raw / len(entry), 1), "entry_fraction_of_raw": round(len(entry) / raw, 5),
            "encode": stats_ms(enc), "decode": stats_ms(dec), "_entry": entry}


def _redis(entry: bytes, sample: int) -> dict[str, Any]:
    import hashlib

    with redis_prefix() as (client, prefix):
        before = int(client.info("memory")["used_memory"])
        usage = []
        for i in range(sample):
            digest = hashlib.sha256(f"bench-{i}".encode()).hexdigest()
            key = f"{prefix}masks:v1:FastSAM-s-bench:{digest[:16]}:{digest}"
            client.set(key, entry, ex=3600)
            client.set(f"{prefix}url:v1:{digest}", digest.encode(), ex=3600)  # the URL -> digest entry
            usage.append(int(client.memory_usage(key, samples=0) or 0)
                         + int(client.memory_usage(f"{prefix}url:v1:{digest}", samples=0) or 0))
        after = int(client.info("memory")["used_memory"])
    per_image = float(np.mean(usage))
    return {"sample_entries": sample, "entry_bytes": len(entry), "memory_usage_per_image_bytes": round(per_image),
            "info_used_memory_delta_per_image_bytes": round((after - before) / sample),
            "extrapolated_1000_images_mb": round(1000 * per_image / 2**20, 1),
            "method": f"MEMORY USAGE of {sample} entries (+ their URL keys) under a private prefix, x1000/{sample}; "
                      "INFO used_memory delta shown as a cross-check (other clients may move it)"}


def run(ctx: Context) -> dict[str, Any]:
    sets: dict[str, Any] = {}
    model = _model_masks(ctx)
    if model is not None:
        sets["fastsam_random_weights"] = _codec(model, ctx.mode.cache_reps)
    side = model.image_size[0] if model is not None else ctx.mode.image_side
    sets["scene_ground_truth"] = _codec(_scene_masks(side, TARGET_INSTANCES), ctx.mode.cache_reps)
    out: dict[str, Any] = {"mask_sets": sets}
    largest = max(sets.values(), key=lambda s: s["entry_fraction_of_raw"])
    try:
        out["redis"] = _redis(sets.get("fastsam_random_weights", largest)["_entry"], ctx.mode.redis_sample)
    except Exception as exc:
        out["redis"] = {"error": f"{type(exc).__name__}: {exc}"}
    for s in sets.values():
        s.pop("_entry")
    worst_name = next(k for k, v in sets.items() if v is largest)
    out["headline"] = {"name": f"cache: raw N*H*W bool / codec entry (worst set: {worst_name})",
                       "value": largest["raw_over_entry"], "unit": "x", "target": f">= {RATIO_TARGET:g}x (<= 1/20)",
                       "met": largest["raw_over_entry"] >= RATIO_TARGET,
                       "absolute": "; ".join(f"{k}: {v['instances']} masks {v['entry_bytes'] / 1024:.0f} KiB vs "
                                             f"{v['raw_bool_bytes'] / 2**20:.0f} MiB, enc {v['encode']['p50_ms']:.1f}"
                                             f" ms, dec {v['decode']['p50_ms']:.1f} ms" for k, v in sets.items())}
    return out
