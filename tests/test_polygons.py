"""Polygon outlines with keyhole holes, and interactive answers as polygons (issue #15).

Fast lane: hand-made masks and the ground-truth segmenter (no torch). The fixture model's
polygons against its brush masks, hard scenes included, are measured in test_hardscenes.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from fastsam_backend.ls.polygons import PolygonStyle, mask_outlines, outlines_mask
from fastsam_backend.ls.protocol import SetupRequest, predict_request
from fastsam_backend.ls.rle import decode_rle
from fastsam_backend.quality import lsrequests
from fastsam_backend.quality.fake import GroundTruthSegmenter
from fastsam_backend.quality.hardscenes import dev_seeds, generate_hard_scene
from fastsam_backend.service.orchestrator import build_service
from fastsam_backend.settings import BoxRule, InteractiveOutput
from tests.helpers import interior_point, iou


def disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def ring() -> np.ndarray:
    return disc(120, 120, 60, 60, 50) & ~disc(120, 120, 60, 60, 35)


def frame_with_island() -> np.ndarray:
    m = np.zeros((80, 100), bool)
    m[5:75, 5:95] = True
    m[15:65, 15:85] = False
    m[30:50, 40:60] = True  # a piece inside the hole: a polygon of its own
    return m


def two_holes() -> np.ndarray:
    m = np.zeros((60, 120), bool)
    m[5:55, 5:115] = True
    m[15:45, 15:50] = False
    m[15:45, 70:105] = False
    return m


@pytest.mark.parametrize("mask, pieces, hole", [
    (ring(), 1, (60, 60)), (frame_with_island(), 2, (20, 20)), (two_holes(), 1, (30, 30)),
])
def test_holes_survive_as_keyholes(mask, pieces, hole):
    outlines = mask_outlines(mask)
    assert len(outlines) == pieces
    decoded = outlines_mask(outlines, mask.shape)
    assert iou(decoded, mask) >= 0.95
    assert not mask[hole] and not decoded[hole]  # the hole stays empty (LS polygons have no holes)


def test_a_filled_mask_is_its_outline_and_an_empty_mask_has_none():
    m = np.zeros((40, 50), bool)
    m[10:30, 5:45] = True
    (outline,) = mask_outlines(m)
    assert len(outline) == 4
    assert iou(outlines_mask([outline], m.shape), m) == 1.0
    assert mask_outlines(np.zeros((10, 10), bool)) == []


def test_vertex_cap_and_zero_tolerance():
    m = ring()
    every = mask_outlines(m, PolygonStyle(tolerance_px=0, max_points=100_000))[0]
    simple = mask_outlines(m)[0]
    capped = mask_outlines(m, PolygonStyle(tolerance_px=0.5, max_points=24))[0]
    assert len(every) > len(simple) > len(capped) and len(capped) <= 24
    assert iou(outlines_mask([capped], m.shape), m) >= 0.85


def test_polygons_of_the_hard_scenes_objects_match_their_masks():
    """Rings, frames, bars and the visible rest of hidden shapes: the issue's ≥ 0.95 mean and ≥ 0.85
    5th percentile hold on the ground truth itself (the fixture's masks: test_hardscenes.py)."""
    ious = []
    for seed in dev_seeds(6):
        scene = generate_hard_scene(seed)
        for obj in scene.objects:
            ious.append(iou(outlines_mask(mask_outlines(obj.mask), obj.mask.shape), obj.mask))
    print(f"mean {np.mean(ious):.4f}, p5 {np.percentile(ious, 5):.4f}, n {len(ious)}")
    assert np.mean(ious) >= 0.95 and np.percentile(ious, 5) >= 0.85


# ----------------------------------------------------------------- interactive answers

POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="Banana"/><Label value="Orange"/></PolygonLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Orange"/></KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true"><Label value="Orange"/></RectangleLabels>
</View>"""
BRUSH_TAG = '<BrushLabels name="tag" toName="image"><Label value="Orange"/></BrushLabels>'
BOTH_CONFIG = POLYGON_CONFIG.replace("<KeyPointLabels", BRUSH_TAG + "\n  <KeyPointLabels")


@pytest.fixture(scope="module")
def hard():
    """The first development hard scene with a hollow object."""
    return next(s for s in map(generate_hard_scene, dev_seeds(20)) if s.of_case("hollow"))


@pytest.fixture(scope="module")
def service(make_settings, hard):
    return build_service(make_settings(clip_enabled=False), GroundTruthSegmenter([hard]))


def ask(service, scene, config, region, project=None):
    task = {"id": 1, "data": {"image": lsrequests.data_uri(scene.image)}}
    (pred,) = service.predict(predict_request([task], {"result": [region]}, config, project))
    return pred


def ring_index(scene) -> int:
    return next(i for i in scene.of_case("hollow"))


@pytest.mark.parametrize("config, mode, kinds", [
    (POLYGON_CONFIG, None, {"polygonlabels"}),  # auto: polygons when there is no BrushLabels
    (BOTH_CONFIG, None, {"brushlabels"}),  # auto: brush when there is one
    (BOTH_CONFIG, "polygon", {"polygonlabels"}),
    (BOTH_CONFIG, "both", {"brushlabels", "polygonlabels"}),
])
def test_clicks_and_boxes_answer_in_the_configured_region_type(service, hard, config, mode, kinds):
    project = None
    if mode is not None:
        project = f"poly-{mode}.1"
        service.setup(SetupRequest(project, extra_params={"interactive_output": mode}))
    obj = hard.objects[ring_index(hard)]
    h, w = obj.mask.shape
    x, y = interior_point(obj.mask)
    for region in (lsrequests.keypoint(x, y, w, h, label="Orange"), lsrequests.box_of(obj.mask)):
        pred = ask(service, hard, config, region, project)
        assert {r["type"] for r in pred["result"]} == kinds
        errors = LabelInterface(config).validate_prediction({"result": pred["result"]}, return_errors=True)
        assert errors in (True, [], None), errors
        for r in pred["result"]:
            if r["type"] == "polygonlabels":
                assert r["value"]["polygonlabels"] == ["Orange"] and r["value"]["closed"]
                pts = np.array(r["value"]["points"]) * [w / 100, h / 100]
                assert iou(outlines_mask([pts], (h, w)), obj.mask) >= 0.95  # the ring, its hole kept
            else:
                assert iou(decode_rle(r["value"]["rle"], h, w), obj.mask) >= 0.99


def test_a_mode_the_config_cannot_serve_is_a_400_naming_it(service, hard):
    from fastsam_backend.errors import BadRequest

    service.setup(SetupRequest("poly-brush.1", extra_params={"interactive_output": "brush"}))
    h, w = hard.image.shape[:2]
    with pytest.raises(BadRequest, match=r"'brush'.*BrushLabels"):
        ask(service, hard, POLYGON_CONFIG, lsrequests.keypoint(5, 5, w, h), "poly-brush.1")


def test_model_version_names_the_box_rule_and_the_polygon_settings(make_settings, hard):
    base = build_service(make_settings(clip_enabled=False), GroundTruthSegmenter([hard]))
    version = base.model_version
    assert "-bfit-pk1x400" in version
    variants = [dict(box_rule=BoxRule.PAPER), dict(polygon_tolerance_px=2.0), dict(polygon_max_points=100),
                dict(interactive_output=InteractiveOutput.POLYGON)]
    seen = {version}
    for overrides in variants:
        other = build_service(make_settings(clip_enabled=False, **overrides), GroundTruthSegmenter([hard]))
        seen.add(other.model_version)
        per_project = base.setup(SetupRequest("v.1", extra_params={k: getattr(v, "value", v)
                                                                   for k, v in overrides.items()}))
        assert per_project == other.model_version  # the same outputs, the same version
    assert len(seen) == len(variants) + 1
