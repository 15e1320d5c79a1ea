"""Label Studio requests as a user's click, box or text would produce them: one builder for the
quality harness, the tests, the benchmarks and the scripts.

Regions are in percent of the image, as LS sends them in ``params.context.result``; pixel
arguments are ``x`` (column), ``y`` (row) of the original image, boxes ``x0, y0, x1, y1`` with
exclusive end. ``captured`` returns requests a real Label Studio 1.23.2 sent.
"""

from __future__ import annotations

import base64
import copy
import io
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastsam_backend.ls.rle import encode_rle

CAPTURED = Path(__file__).with_name("ls-requests.json")

# The label config the tests and benchmarks speak (names match the captured requests).
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Banana"/><Label value="Orange"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Banana"/><Label value="Orange"/></KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Banana"/><Label value="Orange"/></RectangleLabels>
  <TextArea name="prompt" toName="image" editable="true" rows="2" showSubmitButton="true"/>
</View>"""


def png_bytes(image: np.ndarray) -> bytes:
    """``(H, W, 3)`` uint8 RGB (or ``(H, W)`` gray) as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(image: np.ndarray) -> str:
    """The image as a ``data:image/png;base64,…`` URL (a task that needs no image server)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def keypoint(x: int, y: int, width: int, height: int, *, positive: bool = True, label: str = "Banana",
             from_name: str = "tag2") -> dict[str, Any]:
    """A smart-keypoint click on pixel ``(x, y)`` (its centre); ``positive`` False is an Alt-click."""
    return {"id": "k1", "from_name": from_name, "to_name": "image", "type": "keypointlabels", "origin": "manual",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100.0 * (x + 0.5) / width, "y": 100.0 * (y + 0.5) / height, "width": 0.5,
                      "keypointlabels": [label]},
            "is_positive": positive}


def rectangle(x0: int, y0: int, x1: int, y1: int, width: int, height: int, *, label: str = "Orange",
              from_name: str = "tag3") -> dict[str, Any]:
    """A smart-rectangle drag over pixels ``x0:x1``, ``y0:y1``."""
    return {"id": "r1", "from_name": from_name, "to_name": "image", "type": "rectanglelabels", "origin": "manual",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100.0 * x0 / width, "y": 100.0 * y0 / height, "width": 100.0 * (x1 - x0) / width,
                      "height": 100.0 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label]}}


def box_of(mask: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    """``rectangle`` around the tight box of ``(H, W)`` bool ``mask``."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rectangle(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1, w, h, **kwargs)


def text(phrase: str, from_name: str = "prompt") -> dict[str, Any]:
    """A TextArea prompt as LS sends it in ``context.result``."""
    return {"type": "textarea", "from_name": from_name, "to_name": "image", "value": {"text": [phrase]}}


def brush(mask: np.ndarray, index: int = 0, label: str = "Banana", from_name: str = "tag") -> dict[str, Any]:
    """An annotated BrushLabels region (what LS carries along in a task's annotations)."""
    h, w = mask.shape
    return {"id": f"brush{index}", "from_name": from_name, "to_name": "image", "type": "brushlabels",
            "origin": "manual", "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": [label]}}


def predict_body(image_url: str, regions: list[dict[str, Any]] | None, *, label_config: str = LABEL_CONFIG,
                 task_id: int = 1, project: str | None = None) -> dict[str, Any]:
    """A ``/predict`` body for one task; ``regions`` None is a batch (pre-annotation) request."""
    context = None if regions is None else {"result": regions}
    return {"tasks": [{"id": task_id, "data": {"image": image_url}}], "label_config": label_config,
            "project": project, "params": {"login": None, "password": None, "context": context}}


@cache
def _captured() -> list[dict[str, Any]]:
    return json.loads(CAPTURED.read_text())["requests"]


def captured(path: str, interactive: bool | None = None) -> dict[str, Any]:
    """A fresh copy of a request Label Studio 1.23.2 sent to ``path`` (``/predict``: with or
    without a click context)."""
    for req in _captured():
        if req["path"] != path:
            continue
        if interactive is None or path != "/predict" or bool(req["body"]["params"]["context"]) == interactive:
            return copy.deepcopy(req["body"])
    raise KeyError(path)


def captured_requests() -> list[dict[str, Any]]:
    return copy.deepcopy(_captured())
