"""int8 ONNX Runtime (fastsam_backend.int8): the quantized fixture loads, keeps its head fp32 and its
dynamic axes, gets its own model identity, and its masks are compared instance by instance.

Whether int8 holds the quality bar is measured, not asserted (docs/benchmarks.md: it does not on the fixture).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig, onnx_fixed_imgsz
from fastsam_backend.quality.scenes import generate_scene
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ

onnx = pytest.importorskip("onnx")  # exporting needs onnx + onnxslim (requirements-dev.txt)
from fastsam_backend.models.int8 import compare, head_nodes, match, quantize  # noqa: E402


def _set(boxes, size=(8, 8)):
    crops = tuple(np.ones((y1 - y0, x1 - x0), bool) for x0, y0, x1, y1 in boxes)
    return MaskSet(size, np.asarray(boxes, np.int32).reshape(-1, 4), np.ones(len(boxes), np.float32), crops)


@pytest.mark.parametrize(("reference", "candidate", "ious", "lost"), [
    ([(0, 0, 4, 4)], [(0, 0, 4, 4)], [1.0], 0),
    ([(0, 0, 4, 4)], [(0, 0, 4, 3)], [0.75], 0),
    ([(0, 0, 4, 4)], [(4, 4, 8, 8)], [], 1),  # no box overlap: lost, not matched at IoU 0
    ([(0, 0, 4, 4), (4, 4, 8, 8)], [], [], 2),
    ([], [(0, 0, 4, 4)], [], 0),
])
def test_match_table(reference, candidate, ious, lost):
    got, missing = match(_set(reference), _set(candidate))
    assert got == pytest.approx(ious) and missing == lost


def _config(weights):
    return SegmenterConfig(weights=str(weights), model_dir=weights.parent, imgsz=FIXTURE_IMGSZ, conf=FIXTURE_CONF,
                           iou=0.7, allow_download=False)


@pytest.mark.model
def test_quantized_fixture_serves_with_its_own_identity(fastsam_weights, tmp_path):
    pt = tmp_path / fastsam_weights.name
    shutil.copy(fastsam_weights, pt)
    fp32 = Segmenter(_config(pt)).export_onnx()
    int8 = quantize(fp32, fp32.with_suffix(".int8.onnx"),
                    (generate_scene(s, (FIXTURE_IMGSZ, FIXTURE_IMGSZ)).image for s in range(10, 14)), FIXTURE_IMGSZ)
    model = onnx.load(str(int8))
    head = set(head_nodes(model))
    dequantized = {out for n in model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert any(n.input[1] in dequantized for n in convs if n.name not in head)  # int8 weights in the backbone
    assert not any(n.input[1] in dequantized for n in convs if n.name in head)  # the head's stay fp32
    assert onnx_fixed_imgsz(int8) is None  # dynamic axes kept
    ref, cand = Segmenter(_config(fp32)), Segmenter(_config(int8))
    assert ref.identity != cand.identity  # model_version and cache keys differ from fp32
    summary = compare(ref, cand, [generate_scene(1_000_400).image])["summary"]
    assert summary["fp32_instances"] > 0 and summary["int8_instances"] > 0
    assert summary["matched"] + summary["lost"] == summary["fp32_instances"]
    assert summary["mask_iou_median"] > 0.9  # int8, not noise (the strict bar is reported by compare-int8)
