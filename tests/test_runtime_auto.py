"""FASTSAM_RUNTIME=auto: a .pt on a CPU is exported once into MODEL_DIR and served by ONNX Runtime
when its masks match torch's on a check image; else torch, with one log line (models/runtime.py)."""

from __future__ import annotations

import json
import logging

import pytest

from fastsam_backend.errors import ModelUnavailable
from fastsam_backend.models import runtime
from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig
from fastsam_backend.quality.scenes import generate_scene
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ

pytestmark = pytest.mark.model  # loads a real model (torch): not in `make test-fast`


def _seg(weights, model_dir, runtime_name="auto"):
    return Segmenter(SegmenterConfig(weights=str(weights), model_dir=model_dir, device="cpu", imgsz=FIXTURE_IMGSZ,
                                     conf=FIXTURE_CONF, iou=0.7, allow_download=False, runtime=runtime_name))


@pytest.fixture(scope="module")
def exported(fastsam_weights, tmp_path_factory):
    """One auto-loaded segmenter (it exports) and its MODEL_DIR."""
    model_dir = tmp_path_factory.mktemp("models")
    seg = _seg(fastsam_weights, model_dir)
    seg.load()
    return seg, model_dir


def test_auto_exports_once_checks_and_serves_onnx_under_the_pt_identity(exported, fastsam_weights):
    seg, model_dir = exported
    target = runtime.export_path(fastsam_weights, model_dir)
    assert seg.runtime == "onnx" and target.is_file()
    verdict = json.loads(target.with_suffix(".onnx.json").read_text())
    assert verdict["passed"] and verdict["mask_iou"] >= runtime.CHECK_IOU
    assert verdict["min_mask_iou"] >= runtime.CHECK_WORST_IOU
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([target.name, target.name + ".json"])  # no leftovers
    torch_seg = _seg(fastsam_weights, model_dir, "torch")
    assert torch_seg.identity == seg.identity  # same model_version and mask cache keys as torch
    image = generate_scene(1_000_410).image
    ours, theirs = seg.segment(image), torch_seg.segment(image)
    assert torch_seg.runtime == "torch" and len(ours) > 0
    overall, worst = runtime.agreement(theirs, ours)
    assert overall >= runtime.CHECK_IOU and worst >= runtime.CHECK_WORST_IOU


def test_a_second_process_reuses_the_export_and_its_verdict(exported, fastsam_weights, monkeypatch):
    _, model_dir = exported
    monkeypatch.setattr(runtime, "_export", lambda *a: pytest.fail("exported again"))
    monkeypatch.setattr(runtime, "agreement", lambda *a: pytest.fail("checked again"))
    seg = _seg(fastsam_weights, model_dir)
    seg.load()
    assert seg.runtime == "onnx"


def test_a_read_only_model_dir_serves_torch_with_one_log_line(fastsam_weights, tmp_path, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where MODEL_DIR should be")  # unwritable even for root
    caplog.set_level(logging.WARNING, logger="fastsam_backend.models.runtime")
    seg = _seg(fastsam_weights, blocked)
    seg.load()
    assert seg.runtime == "torch" and len(seg.segment(generate_scene(1_000_411).image)) > 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "serving torch" in lines[0] and "MODEL_DIR" in lines[0], lines
    with pytest.raises(ModelUnavailable, match="FASTSAM_RUNTIME=onnx"):
        _seg(fastsam_weights, blocked, "onnx").load()


def test_masks_that_differ_serve_torch_and_torch_never_exports(fastsam_weights, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "agreement", lambda ref, other: (0.5, 0.5))  # as if the export segmented differently
    caplog.set_level(logging.WARNING, logger="fastsam_backend.models.runtime")
    seg = _seg(fastsam_weights, tmp_path)
    seg.load()
    assert seg.runtime == "torch" and "differ from torch" in caplog.text
    with pytest.raises(ModelUnavailable, match="differ"):
        _seg(fastsam_weights, tmp_path, "onnx").load()  # the verdict beside the export says so
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    plain = _seg(fastsam_weights, fresh, "torch")
    plain.load()
    assert plain.runtime == "torch" and not any(fresh.iterdir())


@pytest.mark.parametrize("runtime_name", ["torch", "auto"])
def test_segmenting_keeps_the_process_torch_thread_plan(fastsam_weights, tmp_path, runtime_name):
    """ultralytics' predictor set-up resets torch's threads to min(8, cores - 1) (1 on 2 cores), which
    halved the CLIP text tower and the mask decoding after the first image; the plan must stay."""
    import torch
    from ultralytics.utils import NUM_THREADS

    before = torch.get_num_threads()
    plan = 3 if NUM_THREADS != 3 else 2  # any count ultralytics would not set by itself
    try:
        torch.set_num_threads(plan)
        seg = _seg(fastsam_weights, tmp_path, runtime_name)
        seg.segment(generate_scene(5).image)
        assert torch.get_num_threads() == plan
        seg.segment(generate_scene(6).image)
        assert torch.get_num_threads() == plan
    finally:
        torch.set_num_threads(before)
