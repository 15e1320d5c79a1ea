"""int8 FastSAM for ONNX Runtime: static quantization of a dynamic-axes export, and its check.

``quantize(onnx_path, out, images, imgsz)`` writes a QDQ model (int8 weights per channel, uint8
activations, ranges calibrated by min/max with a moving average over ``images`` letterboxed as
ultralytics feeds them). The segmentation head (the last ``/model.<N>/`` module: box, class and
mask-coefficient branches, the prototype branch and the box decoding) stays fp32: quantizing it
puts box coordinates (0..imgsz) and class scores (0..1) on one scale and every detection is lost.
Input and output axes stay dynamic, so the file serves any IMGSZ like the fp32 export.

``compare(reference, candidate, images)`` is what ``fastsam-backend compare-int8`` prints: per
fp32 instance its best box match among the int8 instances (matched when box IoU >= 0.5) and the
pixel IoU of the two masks. Needs ``onnx`` and ``onnxruntime`` (``requirements-dev.txt``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastsam_backend.core.boxmatch import box_box_ious
from fastsam_backend.core.masks import MaskSet, crop_iou

MATCH_BOX_IOU = 0.5  # an int8 instance is "the same" fp32 instance when their boxes overlap this much
MASK_IOU_BAR = 0.98  # issue #16: every matched instance's mask IoU against fp32


def head_nodes(model) -> list[str]:
    """Names of the nodes of the last ``/model.<N>/`` module (ultralytics' Segment head)."""
    index = re.compile(r"^/model\.(\d+)/")
    found = [int(m.group(1)) for n in model.graph.node if (m := index.match(n.name))]
    if not found:
        raise ValueError("not an ultralytics export: no /model.<N>/ node names")
    head = f"/model.{max(found)}/"
    return [n.name for n in model.graph.node if n.name.startswith(head)]


def letterboxed(image_rgb: np.ndarray, imgsz: int) -> np.ndarray:
    """``(1, 3, h, w)`` float32 0-1 RGB, as ultralytics' predictor feeds the network (letterbox, stride 32)."""
    from ultralytics.data.augment import LetterBox

    boxed = LetterBox(imgsz, auto=True, stride=32)(image=np.ascontiguousarray(image_rgb[:, :, ::-1]))
    return np.ascontiguousarray(boxed[:, :, ::-1].transpose(2, 0, 1))[None].astype(np.float32) / 255


def quantize(onnx_path: Path, out: Path, images: Iterable[np.ndarray], imgsz: int) -> Path:
    """Write the int8 (QDQ) version of the fp32 export ``onnx_path`` to ``out``, calibrated on ``images``
    (``(H, W, 3)`` uint8 RGB; a few dozen typical images). ultralytics' metadata is kept."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(onnx_path))
    input_name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self._it, None)
            return None if image is None else {input_name: letterboxed(image, imgsz)}

    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(onnx_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=head_nodes(model), extra_options={"CalibMovingAverage": True})
    return out


def match(reference: MaskSet, candidate: MaskSet) -> tuple[list[float], int]:
    """``(mask IoUs of the matched reference instances, number of reference instances unmatched)``."""
    ious, lost = [], 0
    for i in range(len(reference)):
        if not len(candidate):
            lost += 1
            continue
        overlap = box_box_ious(candidate, tuple(int(v) for v in reference.boxes[i]))
        j = int(np.argmax(overlap))
        if overlap[j] < MATCH_BOX_IOU:
            lost += 1
            continue
        ious.append(crop_iou(reference.boxes[i], reference.crops[i], candidate.boxes[j], candidate.crops[j]))
    return ious, lost


def compare(reference, candidate, images: Sequence[np.ndarray]) -> dict[str, Any]:
    """Segment every image with both segmenters (``.segment(image) -> MaskSet``) and summarize agreement."""
    ious: list[float] = []
    lost = ref_n = cand_n = 0
    per_image = []
    for image in images:
        a, b = reference.segment(image), candidate.segment(image)
        got, missing = match(a, b)
        ious += got
        lost += missing
        ref_n, cand_n = ref_n + len(a), cand_n + len(b)
        per_image.append({"fp32": len(a), "int8": len(b), "lost": missing,
                          "mask_iou_min": round(min(got), 4) if got else None})
    arr = np.asarray(ious)
    summary = {"images": len(images), "fp32_instances": ref_n, "int8_instances": cand_n, "matched": int(arr.size),
               "lost": lost, "mask_iou_min": round(float(arr.min()), 4) if arr.size else None,
               "mask_iou_median": round(float(np.median(arr)), 4) if arr.size else None,
               f"share_iou_ge_{MASK_IOU_BAR}": round(float((arr >= MASK_IOU_BAR).mean()), 4) if arr.size else None}
    summary["holds"] = bool(arr.size) and lost == 0 and float(arr.min()) >= MASK_IOU_BAR
    return {"summary": summary, "per_image": per_image}
