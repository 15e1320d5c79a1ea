"""FASTSAM_WEIGHTS=<export>.onnx: the same Segmenter on ONNX Runtime (bench: 1.56-1.87x at 1024, 2 cores)."""

from __future__ import annotations

import shutil

import pytest

from bench.onnx import agreement
from fastsam_backend.errors import ModelUnavailable
from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig, onnx_fixed_imgsz
from fastsam_backend.quality.scenes import generate_scene
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ

pytestmark = pytest.mark.model  # loads a real model (torch): not in `make test-fast`

pytest.importorskip("onnx")  # exporting needs onnx + onnxslim (requirements-dev.txt)


def _config(weights, imgsz=FIXTURE_IMGSZ):
    return SegmenterConfig(weights=str(weights), model_dir=weights.parent, imgsz=imgsz, conf=FIXTURE_CONF, iou=0.7,
                           allow_download=False)


@pytest.fixture(scope="module")
def exported(fastsam_weights, tmp_path_factory):
    pt = tmp_path_factory.mktemp("onnx") / fastsam_weights.name
    shutil.copy(fastsam_weights, pt)
    path = Segmenter(_config(pt)).export_onnx()
    assert path.suffix == ".onnx" and path.is_file()
    return pt, path


def test_onnx_masks_match_torch(exported):
    pt, onnx_path = exported
    assert onnx_fixed_imgsz(onnx_path) is None  # dynamic axes
    torch_seg, ort_seg = Segmenter(_config(pt)), Segmenter(_config(onnx_path))
    assert torch_seg.identity != ort_seg.identity  # separate cache entries
    for seed in (1_000_400, 1_000_401):
        image = generate_scene(seed).image
        ours, theirs = torch_seg.segment(image), ort_seg.segment(image)
        assert len(ours) == len(theirs) > 0
        agree = agreement(ours, theirs)  # each torch instance against its best box match
        assert agree["mask_iou_min"] >= 0.99, (seed, agree)


def test_a_static_export_must_match_imgsz(exported):
    from ultralytics import YOLO

    pt, _ = exported
    static = pt.parent / "static" / pt.name
    static.parent.mkdir()
    shutil.copy(pt, static)
    path = YOLO(str(static)).export(format="onnx", imgsz=FIXTURE_IMGSZ, device="cpu", verbose=False)
    with pytest.raises(ModelUnavailable, match=f"fixed imgsz {FIXTURE_IMGSZ} but IMGSZ is 320"):
        Segmenter(_config(type(pt)(path), imgsz=320)).load()
