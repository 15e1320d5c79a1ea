"""Section — exemplar prompts (issue #26): answering "every object like this one" vs a warm click.

In-process, through the Flask app's test client (``/predict``: the server's body decoding, the
service, the orjson answer; no sockets, no gunicorn), on a 1024² image with 100 cached instances
(20 of one kind: 20 regions answered), the image read from ``LOCAL_FILES_DOCUMENT_ROOT``, the
masks those of ``GroundTruthSegmenter`` (the cost judged is the selection's, not a network pass).
Measured in the same run:

- a warm click (an ordinary smart keypoint on an instance) — the reference;
- the first exemplar box on the image: masks cached, its instance cues and CLIP embeddings not
  (the image is read, geometry and colour computed, 100 crops embedded with the fixture CLIP,
  already loaded), and the geometry and colour alone;
- warm exemplar boxes: everything cached. Target: p50 and p95 ≤ 2× the warm click's. A click
  answers one region and an exemplar box 20: ``ratio_p50_per_region`` compares the exemplar with
  the 20 clicks it replaces, and ``selection_only`` the selections without building regions (the
  exemplar's: its box's instance, the cached cues, the similarity and cut, 20 selections).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import Context, stats_ms

RATIO_TARGET = 2.0
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "models"


def _body(regions: list[dict], config: str) -> bytes:
    task = {"id": 1, "data": {"image": "/data/local-files/?d=exemplars.png"}}
    return json.dumps({"tasks": [task], "label_config": config, "params": {"context": {"result": regions}}}).encode()


def run(ctx: Context) -> dict[str, Any]:
    from fastsam_backend.core.exemplars import instance_cues
    from fastsam_backend.core.selection import select_by_points
    from fastsam_backend.ls.labelconfig import parse_label_config
    from fastsam_backend.ls.prompts import parse_context
    from fastsam_backend.ls.protocol import decode_predict
    from fastsam_backend.quality import lsrequests
    from fastsam_backend.quality.exemplar_eval import LABEL_CONFIG
    from fastsam_backend.quality.exemplar_scenes import crowded_kind_scene
    from fastsam_backend.quality.fake import GroundTruthSegmenter
    from fastsam_backend.server import create_app
    from fastsam_backend.service.exemplars import select_exemplars
    from fastsam_backend.service.orchestrator import build_service
    from fastsam_backend.settings import load_settings

    scene = crowded_kind_scene(7)
    root = ctx.workdir / "exemplars"
    root.mkdir(parents=True, exist_ok=True)
    (root / "exemplars.png").write_bytes(lsrequests.png_bytes(scene.image))
    clip = (FIXTURES / "clip-shapes.json").is_file()
    settings = load_settings(redis_url=None, local_files_document_root=str(root), load_on_start=False,
                             clip_enabled=clip, open_clip_model=str(FIXTURES / "clip-shapes.json"),
                             open_clip_pretrained=str(FIXTURES / "clip-shapes.pt"))
    service = build_service(settings, GroundTruthSegmenter([scene]))
    h, w = scene.image.shape[:2]
    rng = np.random.default_rng(11)
    reps = max(20, ctx.mode.warm_clicks // 3)

    http = create_app(settings, service).test_client()  # the server's own decoding and orjson answer

    def answer(body: bytes) -> int:
        response = http.post("/predict", data=body, content_type="application/json")
        assert response.status_code == 200, response.get_data(as_text=True)[:300]
        return len(response.get_data())

    # the evaluation's config plus an ordinary smart keypoint tool: both prompts parse the same XML
    config = LABEL_CONFIG.replace("<TextArea", '<KeyPointLabels name="kp" toName="image" smart="true">'
                                  '<Label value="object"/></KeyPointLabels>\n  <TextArea')

    def click_body(i: int) -> bytes:
        ys, xs = np.nonzero(scene.objects[i].mask)
        k = int(rng.integers(len(xs)))
        return _body([lsrequests.keypoint(int(xs[k]), int(ys[k]), w, h, label="object", from_name="kp")], config)

    targets = [i for i, o in enumerate(scene.objects) if o.role == "target"]
    exemplar_bodies = [_body([lsrequests.box_of(scene.objects[i].mask, label="object", from_name="similar")],
                             config) for i in targets]
    answer(click_body(0))  # segments (ground truth) and caches the masks; nothing else
    if clip:
        service.models.require_clip()  # loaded before timing: the first exemplar is judged, not the load
    masks = service.masks_for("/data/local-files/?d=exemplars.png").masks
    instance_cues(scene.image, masks)  # once before timing: OpenCV's first colour conversion sets up tables
    started = time.perf_counter()
    instance_cues(scene.image, masks)  # what the first exemplar computes besides the embeddings
    cues_s = time.perf_counter() - started
    started = time.perf_counter()
    first_regions = json.loads(json.dumps(service.predict(decode_predict(exemplar_bodies[0]))[0]["result"]))
    first_s = time.perf_counter() - started
    clicks, exemplars = [], []
    click_bodies = [click_body(int(rng.integers(len(scene.objects)))) for _ in range(reps)]
    for _ in range(3):  # warm-up
        answer(click_bodies[0])
        answer(exemplar_bodies[0])
    for k in range(reps):  # interleaved: the machine's load falls on both alike
        t0 = time.perf_counter()
        answer(click_bodies[k])
        t1 = time.perf_counter()
        answer(exemplar_bodies[k % len(exemplar_bodies)])
        clicks.append(t1 - t0)
        exemplars.append(time.perf_counter() - t1)
    # the selection alone (no regions built): the exemplar's own work vs a click's
    found = service.masks_for("/data/local-files/?d=exemplars.png")
    options = service.options_for(None)
    config = parse_label_config(config)
    tools = config.exemplar_tools(options.exemplar_tags)
    box_prompts = [parse_context(decode_predict(b).context, tools) for b in exemplar_bodies]
    click_prompts = [parse_context(decode_predict(b).context, tools) for b in click_bodies]
    pick_clicks, pick_exemplars = [], []
    for k in range(reps):
        pts = click_prompts[k].points
        t0 = time.perf_counter()
        select_by_points(masks, np.array([p.in_pixels(w, h) for p in pts]), np.array([p.positive for p in pts]),
                         rule=options.point_rule, morphology=options.morphology)
        t1 = time.perf_counter()
        select_exemplars(service, found, box_prompts[k % len(box_prompts)], options)
        pick_clicks.append(t1 - t0)
        pick_exemplars.append(time.perf_counter() - t1)
    click, exemplar = stats_ms(clicks), stats_ms(exemplars)
    selection = {"click": stats_ms(pick_clicks), "exemplar": stats_ms(pick_exemplars)}
    selection["ratio_p50"] = round(selection["exemplar"]["p50_ms"] / selection["click"]["p50_ms"], 2)
    p50 = round(exemplar["p50_ms"] / click["p50_ms"], 2)
    p95 = round(exemplar["p95_ms"] / click["p95_ms"], 2)
    regions = len(first_regions)
    return {"instances": len(scene.objects), "answered_regions": regions, "kind_instances": len(targets),
            "clip": clip, "warm_click": click, "warm_exemplar": exemplar,
            "first_exemplar_ms": round(1000 * first_s, 1), "geometry_and_colour_ms": round(1000 * cues_s, 1),
            "ratio_p50": p50, "ratio_p95": p95, "target": RATIO_TARGET, "selection_only": selection,
            # a click answers one region, an exemplar ``regions``: each costs an RLE and a region
            "ratio_p50_per_region": round(p50 / max(regions, 1), 3),
            "headline": {"name": "warm exemplar box (20 regions) / warm click (1 region), p50, 100 cached instances",
                         "value": p50, "unit": "x", "target": f"<= {RATIO_TARGET}",
                         "met": p50 <= RATIO_TARGET and p95 <= RATIO_TARGET}}
