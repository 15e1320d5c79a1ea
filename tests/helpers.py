"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from fastsam_backend.evaluation import (
    click_points,
    iou,  # noqa: F401 - re-exported for the tests
)

FIXTURES = Path(__file__).parent / "fixtures"
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Banana"/><Label value="Orange"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Banana"/><Label value="Orange"/></KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Banana"/><Label value="Orange"/></RectangleLabels>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
</View>"""


def captured_requests() -> list[dict]:
    """Requests a real Label Studio 1.23.2 sent (copied from shared/samples)."""
    return json.loads((FIXTURES / "ls-requests.json").read_text())["requests"]


def captured(path: str, interactive: bool | None = None) -> dict:
    for req in captured_requests():
        if req["path"] != path:
            continue
        if interactive is None or bool(req["body"]["params"]["context"]) == interactive:
            return json.loads(json.dumps(req["body"]))  # a fresh copy to edit
    raise KeyError(path)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """The pixel of ``mask`` farthest from its border, ``(x, y)``."""
    return click_points(mask, np.random.default_rng(0), 0)[0]


def keypoint_region(x: int, y: int, width: int, height: int, positive: bool = True,
                    label: str = "Banana") -> dict:
    return {"id": "k1", "from_name": "tag2", "to_name": "image", "type": "keypointlabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100.0 * (x + 0.5) / width, "y": 100.0 * (y + 0.5) / height, "width": 0.5,
                      "keypointlabels": [label]},
            "is_positive": positive}


def box_region(x0: int, y0: int, x1: int, y1: int, width: int, height: int, label: str = "Orange") -> dict:
    return {"from_name": "tag3", "to_name": "image", "type": "rectanglelabels",
            "original_width": width, "original_height": height,
            "value": {"x": 100.0 * x0 / width, "y": 100.0 * y0 / height, "width": 100.0 * (x1 - x0) / width,
                      "height": 100.0 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label]}}

