"""The hard suite (issue #15): its scenes hold what their case tags say, its seeds are disjoint
from every other range, and on it the fixture model's box rules and polygon answers behave."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from fastsam_backend.quality import hardscenes
from fastsam_backend.quality.evaluation import TEST_SEED0
from fastsam_backend.quality.hardscenes import (
    CASES,
    DEV_SEED0,
    HELD_OUT_SEED0,
    dev_seeds,
    generate_hard_scene,
    held_out_hard_seeds,
)

QUALITY_DOC = Path(__file__).resolve().parents[1] / "docs" / "quality.md"


@pytest.fixture(scope="module")
def scenes():
    return [generate_hard_scene(s) for s in dev_seeds(16)]


def test_a_scene_is_a_function_of_its_seed():
    a, b = generate_hard_scene(DEV_SEED0 + 5), generate_hard_scene(DEV_SEED0 + 5)
    assert np.array_equal(a.image, b.image) and a.cases == b.cases
    assert not np.array_equal(generate_hard_scene(DEV_SEED0 + 6).image[:32, :32], a.image[:32, :32])


def test_seed_ranges_are_disjoint_and_stated_in_the_docs():
    assert TEST_SEED0 + 999_999 < DEV_SEED0 and DEV_SEED0 + 999_999 < HELD_OUT_SEED0
    assert dev_seeds(3) == [2_000_000, 2_000_001, 2_000_002] and held_out_hard_seeds(1) == [3_000_000]
    text = QUALITY_DOC.read_text()
    assert re.search(r"2,000,000", text) and re.search(r"3,000,000", text)


@pytest.mark.slow  # seconds of waiting: the full lane (make test), not make test-fast
def test_every_case_occurs_and_objects_are_what_their_case_says(scenes):
    counts = {case: 0 for case in CASES}
    for scene in scenes:
        assert len(scene.cases) == len(scene.objects) == len(scene.full_areas)
        for i, (obj, case) in enumerate(zip(scene.objects, scene.cases)):
            m = obj.mask
            assert m.sum() >= hardscenes.MIN_VISIBLE_PIXELS
            assert cv2.connectedComponents(m.astype(np.uint8), connectivity=8)[0] == 2  # one piece
            if case in counts:
                counts[case] += 1
            x0, y0, x1, y1 = obj.box
            fill = m.sum() / ((x1 - x0) * (y1 - y0))
            if case == "hollow":  # a hole: background enclosed by the object
                background = ~np.pad(m[y0:y1, x0:x1], 1)
                assert cv2.connectedComponents(background.astype(np.uint8), connectivity=4)[0] - 1 >= 2
                assert fill < 0.8
            elif case == "thin":
                thickness = 2 * cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2, 5).max()
                assert np.hypot(x1 - x0, y1 - y0) >= 5 * thickness
            elif case == "occluded":
                assert m.sum() <= 0.5 * scene.full_areas[i]  # at least half hidden
            elif case == "nested":  # (mostly) inside the box of an earlier, larger object
                def inside(o, box=obj.box):
                    w = min(box[2], o.box[2]) - max(box[0], o.box[0])
                    h = min(box[3], o.box[3]) - max(box[1], o.box[1])
                    return max(w, 0) * max(h, 0) >= 0.75 * (box[2] - box[0]) * (box[3] - box[1])
                assert any(inside(o) and o.mask.sum() > m.sum() for o in scene.objects[:i])
    assert all(n >= 4 for n in counts.values()), counts


# ----------------------------------------------------------------- with the fixture model

@pytest.fixture(scope="module")
def comparison(make_settings):
    from fastsam_backend.quality.comparison import compare_rules
    from fastsam_backend.service.orchestrator import build_service

    service = build_service(make_settings(clip_enabled=False))
    result = compare_rules(service, held_out_hard_seeds(8), generate_hard_scene, clicks_per_object=1)
    print(result.as_json())
    return result


@pytest.mark.model
def test_fit_rule_is_never_worse_than_the_papers_and_near_the_best_mask(comparison):
    """On these 8 scenes (58 objects) `fit` measured 0.876 overall, the paper's rule 0.871, the best
    mask of each object 0.876: what is left is the fixture's segmentation, not the rule."""
    from fastsam_backend.quality.comparison import CEILING

    box = comparison.table("box")
    for case in (*CASES, "all"):
        assert box["fit"][case][0] >= box["paper"][case][0] - 1e-9, case
    assert box["fit"]["all"][0] > box["paper"]["all"][0]
    assert box["fit"]["all"][0] >= box[CEILING]["all"][0] - 0.02


@pytest.mark.model
def test_polygon_answers_decode_to_the_brush_answer(comparison):
    """Issue #15's bar: mean IoU ≥ 0.95 and 5th percentile ≥ 0.85, hollow shapes included."""
    poly = comparison.polygon_summary()
    assert poly["n"] >= 50 and poly["hollow_n"] >= 4
    assert poly["mean"] >= 0.95 and poly["p5"] >= 0.85 and poly["hollow_mean"] >= 0.95
