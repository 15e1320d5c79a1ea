"""Exemplar prompts on the fixture models (issue #26): the held-out scenes of ``quality/exemplar_scenes.py``
through ``FastSAMService.predict``; the full table is ``make quality-exemplars`` (docs/exemplars.md)."""

from __future__ import annotations

import pytest

from fastsam_backend.quality.exemplar_eval import evaluate_exemplars
from fastsam_backend.quality.exemplar_scenes import heldout_seeds
from fastsam_backend.service.orchestrator import build_service

pytestmark = pytest.mark.model  # loads a real model (torch): not in `make test-fast`
SCENES = 8
# Floors under what these 8 scenes measured on the 2-core development machine (2026-12-03): one box
# 0.794 with CLIP (its 24-scene mean is 0.915: these 8 hold the harder ones), 0.858 without.
FLOOR_ONE_BOX, FLOOR_NO_CLIP = 0.75, 0.8


@pytest.fixture(scope="module")
def tables(make_settings):
    out = {}
    for clip in (True, False):
        service = build_service(make_settings(clip_enabled=clip))
        out[clip] = evaluate_exemplars(service, heldout_seeds(SCENES), ("one box", "two boxes"))
    return out


def test_one_exemplar_box_finds_the_kind_on_held_out_scenes(tables):
    one = tables[True]["one box"]
    assert one["mean_f1"] >= FLOOR_ONE_BOX, one
    assert one["fp_same_shape"] <= 0.1 and one["fp_other"] <= 0.1, one


def test_a_second_exemplar_does_not_lose_recall(tables):
    assert tables[True]["two boxes"]["recall"] >= tables[True]["one box"]["recall"]


def test_without_clip_geometry_and_colour_still_find_the_kind(tables):
    assert tables[False]["one box"]["mean_f1"] >= FLOOR_NO_CLIP, tables[False]
