"""Where a warm click's time goes, in-process (Flask test client, no gunicorn, no socket).

Three views of the same prompts and bodies as the HTTP run:

* ``stages``: each step timed on its own, without a profiler — parse of the
  request body (the server's typed msgspec decoder), the cache lookup (``masks_for``), selection (+ morphology), RLE
  encoding of the answer, JSON encoding of the response;
* ``test_client``: the whole Flask request, without a profiler (compared with the
  HTTP figure it gives the cost of gunicorn + the socket + the client);
* ``cprofile``: cumulative time per request of the backend's functions, and the
  top functions by own time (the profiler inflates Python-heavy code).

The in-process app uses the embedded cache (the HTTP run uses Redis).
"""

from __future__ import annotations

import cProfile
import json
import pstats
from typing import Any

import numpy as np

from .common import CONF, IOU, MAX_DET, Context, stats_ms, timed
from .lsbody import IMAGE_URL, captured
from .servers import static_server

# (label, path suffix of the defining file, function name): cumulative ms per request
CATEGORIES = (
    ("whole request (Flask wsgi_app)", "flask/app.py", "wsgi_app"),
    ("request body parse (_predict_body)", "fastsam_backend/server.py", "_predict_body"),
    ("label config parse", "fastsam_backend/ls/labelconfig.py", "parse_label_config"),
    ("context parse", "fastsam_backend/ls/prompts.py", "parse_context"),
    ("cache lookup + decode (masks_for)", "fastsam_backend/service/orchestrator.py", "masks_for"),
    ("selection by point (incl. morphology)", "fastsam_backend/core/selection.py", "select_by_points"),
    ("selection by box", "fastsam_backend/core/selection.py", "select_by_box"),
    ("morphology (smooth_mask)", "fastsam_backend/core/morphology.py", "smooth_mask"),
    ("region build (brush_regions, incl. RLE)", "fastsam_backend/ls/regions.py", "brush_regions"),
    ("RLE encode (encode_rle_crops)", "fastsam_backend/ls/rle.py", "encode_rle_crops"),
    ("response JSON encode (jsonify)", "flask/json/provider.py", "response"),
    ("metrics (prometheus)", "prometheus_client/metrics.py", "observe"),
)


def _app(ctx: Context, inputs: dict[str, Any], ls_base: str):
    from fastsam_backend.server import create_app
    from fastsam_backend.settings import Settings

    built = inputs["built"]
    settings = Settings(fastsam_weights=str(built.path), model_dir=built.path.parent, imgsz=ctx.mode.warm_imgsz,
                        conf=CONF, iou=IOU, max_det=MAX_DET, allow_download=False, redis_url=None,
                        label_studio_url=ls_base, label_studio_api_key="f" * 40, log_level="WARNING")
    return create_app(settings)


def _stages(service, bodies: list[bytes]) -> dict[str, Any]:
    """Each step of a click on its own, through the public functions the service composes."""
    from fastsam_backend.core.morphology import smooth_mask
    from fastsam_backend.core.selection import select_by_box, select_by_points
    from fastsam_backend.ls.prompts import parse_context
    from fastsam_backend.ls.protocol import decode_predict
    from fastsam_backend.ls.rle import encode_rle_crops

    rule, morphology = service.settings.point_rule, service.settings.morphology
    parse, lookup, select, morph, rle, dump = [], [], [], [], [], []
    for body in bodies:
        t, data = timed(lambda body=body: decode_predict(body))  # as the server parses it
        parse.append(t)
        t, found = timed(lambda data=data: service.masks_for(data.tasks[0].data["image"]))
        lookup.append(t)
        masks = getattr(found, "masks", found)  # ImageMasks (or a bare MaskSet)
        h, w = masks.image_size
        prompts = parse_context(data.context)
        points = np.array([p.in_pixels(w, h) for p in prompts.points], dtype=np.int64).reshape(-1, 2)
        positive = np.ones(len(points), dtype=bool)
        if prompts.boxes:
            box = prompts.boxes[0].in_pixels(w, h)
            t, sel = timed(lambda m=masks, b=box, p=points, q=positive: select_by_box(
                m, b, p, q, rule=rule, morphology=morphology))
        else:
            t, sel = timed(lambda m=masks, p=points, q=positive: select_by_points(
                m, p, q, rule=rule, morphology=morphology))
            if sel is not None and morphology:
                morph.append(timed(lambda s=sel, p=points: smooth_mask(s.mask, keep_points=p, box=s.box))[0])
        select.append(t)
        regions = []
        if sel is not None:
            # as answer_regions encodes it (from the selection's crop)
            t, ints = timed(lambda s=sel: list(encode_rle_crops(s.image_size, [s.box], [s.crop])[0]))
            rle.append(t)
            regions = [{"value": {"format": "rle", "rle": ints, "brushlabels": ["Banana"]}}]
        t, _ = timed(lambda r=regions: json.dumps({"results": [{"result": r, "score": 0.5, "model_version": "x"}]}))
        dump.append(t)
    return {"request_json_parse": stats_ms(parse), "cache_lookup_masks_for": stats_ms(lookup),
            "selection_incl_morphology": stats_ms(select), "of_which_morphology_clicks": stats_ms(morph),
            "rle_encode": stats_ms(rle), "response_json_encode": stats_ms(dump)}


def _json_parsers(body: bytes, reps: int = 5) -> dict[str, Any]:
    """The request body parsed by the stdlib and by faster parsers that happen to be installed."""
    import importlib

    out: dict[str, Any] = {"body_mb": round(len(body) / 1e6, 3)}
    for name in ("json", "ujson", "orjson", "msgspec.json"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            out[name] = "not installed"
            continue
        loads = module.decode if name == "msgspec.json" else module.loads
        out[name] = stats_ms([timed(lambda loads=loads: loads(body))[0] for _ in range(reps)])
    from fastsam_backend.ls.protocol import decode_predict

    out["msgspec.json, typed (the server's: skips task annotations)"] = stats_ms(
        [timed(lambda: decode_predict(body))[0] for _ in range(reps)])
    data = json.loads(body)
    for task in data["tasks"]:
        task["annotations"], task["predictions"] = [], []
    light = json.dumps(data).encode()
    out["json_without_task_regions"] = stats_ms([timed(lambda: json.loads(light))[0] for _ in range(reps)])
    return out


def _cprofile(client, bodies: list[bytes]) -> dict[str, Any]:
    profiler = cProfile.Profile()
    profiler.enable()
    for body in bodies:
        client.post("/predict", data=body, content_type="application/json")
    profiler.disable()
    raw = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    n = len(bodies)
    per_request = {}
    for label, suffix, name in CATEGORIES:
        ct = sum(v[3] for (f, _, fn), v in raw.items() if fn == name and f.replace("\\", "/").endswith(suffix))
        if ct:
            per_request[label] = round(1000 * ct / n, 3)
    top = sorted(raw.items(), key=lambda kv: -kv[1][2])[:15]
    return {"cumulative_ms_per_request": per_request,
            "top_own_time_ms_per_request": [
                {"function": f"{f.split('site-packages/')[-1]}:{line}:{fn}", "ms": round(1000 * v[2] / n, 3),
                 "calls_per_request": round(v[1] / n, 1)} for (f, line, fn), v in top]}


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    bodies = inputs["bodies"][: ctx.mode.profile_clicks]
    root = ctx.workdir / "served"
    (root / IMAGE_URL.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (root / IMAGE_URL.lstrip("/")).write_bytes(inputs["png"])
    with static_server(root) as ls_base:
        app = _app(ctx, inputs, ls_base)
        service = app.extensions["fastsam_service"]
        client = app.test_client()
        client.post("/setup", json=captured("/setup", interactive=False))
        first = client.post("/predict", data=bodies[0], content_type="application/json")  # cold: fills the cache
        if first.status_code != 200:
            raise RuntimeError(f"in-process /predict answered {first.status_code}: {first.get_data(as_text=True)}")
        client_times = []
        for body in bodies:
            t, _ = timed(lambda body=body: client.post("/predict", data=body, content_type="application/json"))
            client_times.append(t)
        stages = _stages(service, bodies)
        parsers = _json_parsers(bodies[0])
        profile = _cprofile(client, bodies)
    return {"requests": len(bodies), "test_client": stats_ms(client_times), "stages": stages, "json_parsers": parsers,
            "cprofile": profile,
            "request_body_mb": round(float(np.mean([len(b) for b in bodies])) / 1e6, 3)}
