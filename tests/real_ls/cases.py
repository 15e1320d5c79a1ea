"""Generated scenes the real-LS tests prompt on, and the ground-truth checks of the answers.

Each case names a held-out scene (``fastsam_backend.quality.scenes``, seeds ≥ 1_000_000), the object to
segment and a neighbour that touches or overlaps it. The objects are ones the fixture model
segments well in-process (IoU ≥ 0.95): these tests check the path through Label Studio, not the
model (``tests/test_quality.py`` does that).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageOps

from fastsam_backend.quality import lsrequests
from fastsam_backend.quality.evaluation import iou, text_region
from fastsam_backend.quality.scenes import Scene, SceneObject, generate_scene
from tests.helpers import interior_point

from .harness import decode_brush, image_bytes

MIN_IOU, MAX_NEIGHBOUR_IOU = 0.9, 0.5


@dataclass(frozen=True)
class Case:
    seed: int
    target: int  # index into scene.objects
    neighbour: int
    copy: str = ""  # another task (upload) of the same scene

    @cached_property
    def scene(self) -> Scene:
        return generate_scene(self.seed)

    @property
    def file_name(self) -> str:
        return f"scene-{self.seed}{self.copy}.png"

    def png(self) -> bytes:
        return image_bytes(self.scene.image)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.scene.image.shape[:2]

    @property
    def obj(self) -> SceneObject:
        return self.scene.objects[self.target]

    @property
    def other(self) -> SceneObject:
        return self.scene.objects[self.neighbour]

    def click(self, which: SceneObject | None = None) -> tuple[int, int]:
        """The pixel deepest inside the object, ``(x, y)``."""
        return interior_point((which or self.obj).mask)

    def describe(self) -> str:
        return f"{self.obj.caption} (#{self.target}) of scene {self.seed}, neighbour {self.other.caption}"


@dataclass(frozen=True)
class ExifCase(Case):
    """The scene stored rotated, with an EXIF orientation that turns it upright (what LS shows)."""

    orientation: int = 6  # stored pixels are the upright image turned 90° counter-clockwise

    @property
    def file_name(self) -> str:
        return f"scene-{self.seed}-exif{self.orientation}.jpg"

    def jpeg(self) -> bytes:
        stored = np.ascontiguousarray(np.rot90(self.scene.image, 1 if self.orientation == 6 else -1))
        exif = Image.Exif()
        exif[0x0112] = self.orientation
        data = image_bytes(stored, "JPEG", exif=exif.tobytes())
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        assert upright.shape == self.scene.image.shape and \
            np.abs(upright.astype(int) - self.scene.image).mean() < 8, "EXIF orientation does not turn it upright"
        return data


# API (tests/real_ls/test_api.py)
KEYPOINT = Case(1_000_033, target=8, neighbour=6)  # red hexagon, green star beside it
BOX = Case(1_000_027, target=3, neighbour=4)  # yellow rectangle
TEXT = Case(1_000_033, target=8, neighbour=6)  # "red hexagon" names one object of the scene
NEGATIVE = Case(1_000_031, target=1, neighbour=4)  # yellow circle; Alt-click on the blue square
ENCLOSED = Case(1_000_205, target=0, neighbour=1)  # red circle holding a small orange triangle
# Browser (tests/real_ls/test_browser.py)
UI_KEYPOINT = Case(1_000_020, target=4, neighbour=2)  # blue rectangle
UI_BOX = Case(1_000_026, target=5, neighbour=3)  # green square
# "yellow hexagon", then "green square" (LS then sends both texts of the TextArea)
UI_TEXTS = (Case(1_000_026, 1, 5, copy="-text"), Case(1_000_026, 5, 1, copy="-text"))
UI_EXIF = ExifCase(1_000_008, target=3, neighbour=0)  # purple hexagon, 850x314 upright


def region_names(config_names: dict[str, str], region: dict) -> dict:
    """``region`` with the from_name of the tag of its type in the tested config."""
    return {**region, "from_name": config_names[region["type"]], "to_name": "image"}


def keypoint(case: Case, names: dict[str, str], which: SceneObject | None = None, positive: bool = True,
             label: str = "Banana") -> dict:
    h, w = case.size
    x, y = case.click(which)
    return region_names(names, lsrequests.keypoint(x, y, w, h, positive=positive, label=label))


def box(case: Case, names: dict[str, str], label: str = "Orange") -> dict:
    h, w = case.size
    return region_names(names, lsrequests.rectangle(*case.obj.box, w, h, label=label))


def text(phrase: str, names: dict[str, str]) -> dict:
    return region_names(names, text_region(phrase))


def brush_masks(result: list[dict]) -> list[np.ndarray]:
    return [decode_brush(r) for r in result if r.get("type") == "brushlabels"]


def check_mask(mask: np.ndarray, case: Case) -> str:
    """Assert ``mask`` is the case's object and not its neighbour; a one-line summary."""
    assert mask.shape == case.obj.mask.shape, f"mask {mask.shape}, image {case.obj.mask.shape}"
    on, off = iou(mask, case.obj.mask), iou(mask, case.other.mask)
    detail = f"IoU {on:.3f} with {case.obj.caption}, {off:.3f} with {case.other.caption}"
    assert on >= MIN_IOU and off < MAX_NEIGHBOUR_IOU, f"{case.describe()}: {detail}"
    return detail
