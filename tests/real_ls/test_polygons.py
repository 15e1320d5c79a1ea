"""Interactive polygon answers in a real Label Studio (issue #15): a project whose config has
PolygonLabels and no BrushLabels gets polygon regions for clicks and boxes (``INTERACTIVE_OUTPUT``
auto), Label Studio stores them as an annotation, and they outline the object, a ring's hole
kept as a keyhole cut."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import numpy as np
import pytest

from fastsam_backend.ls.polygons import outlines_mask
from fastsam_backend.quality import lsrequests
from fastsam_backend.quality.evaluation import iou
from fastsam_backend.quality.hardscenes import generate_hard_scene
from fastsam_backend.quality.scenes import Scene

from .cases import BOX, MIN_IOU, Case

CONFIG = """<View>
  <KeyPointLabels name="click" toName="image" smart="true" smartOnly="true">
    <Label value="Ring"/><Label value="Shape"/>
  </KeyPointLabels>
  <RectangleLabels name="drag" toName="image" smart="true" smartOnly="true">
    <Label value="Ring"/><Label value="Shape"/>
  </RectangleLabels>
  <PolygonLabels name="outline" toName="image"><Label value="Ring"/><Label value="Shape"/></PolygonLabels>
  <Image name="image" value="$image"/>
</View>"""


@dataclass(frozen=True)
class HardCase(Case):
    """A development scene of the hard suite (``quality.hardscenes``)."""

    @cached_property
    def scene(self) -> Scene:
        return generate_hard_scene(self.seed)

    @property
    def file_name(self) -> str:
        return f"hard-{self.seed}.png"


RING = HardCase(2_000_025, target=5, neighbour=4)  # a thin ring the fixture segments (IoU 0.97 in-process)


@pytest.fixture(scope="module")
def project(label_studio, backend):
    api = label_studio.api
    pid = api.create_project("fastsam polygon answers", CONFIG)
    tasks = api.upload(pid, {c.file_name: c.png() for c in (RING, BOX)})
    ml = api.connect_ml(pid, backend.url)
    return SimpleNamespace(id=pid, tasks=tasks, ml=ml, api=api)


def polygons(project, case: Case, region: dict) -> list[dict]:
    answer = project.api.interactive(project.ml["id"], project.tasks[case.file_name]["id"], [region])
    assert "data" in answer, f"LS answered {str(answer)[:600]}"
    result = answer["data"].get("result") or []
    assert result and {r["type"] for r in result} == {"polygonlabels"}, str(result)[:600]
    return result


def filled(regions: list[dict], case: Case) -> np.ndarray:
    h, w = case.size
    outlines = [np.asarray(r["value"]["points"], np.float64) * [w / 100, h / 100] for r in regions]
    return outlines_mask(outlines, (h, w))


def accepted(project, case: Case, regions: list[dict]) -> list[dict]:
    """Label Studio stores the regions as an annotation of the task; what it stored."""
    task = project.tasks[case.file_name]["id"]
    created = project.api.json("POST", f"/api/tasks/{task}/annotations", json={"result": regions})
    return project.api.json("GET", f"/api/annotations/{created['id']}")["result"]


def test_a_click_on_a_ring_returns_its_outline_with_the_hole(project, note):
    h, w = RING.size
    x, y = RING.click()
    click = {**lsrequests.keypoint(x, y, w, h, label="Ring", from_name="click"), "to_name": "image"}
    regions = polygons(project, RING, click)
    assert all(r["from_name"] == "outline" and r["value"]["polygonlabels"] == ["Ring"] for r in regions)
    mask = filled(regions, RING)
    on, off = iou(mask, RING.obj.mask), iou(mask, RING.other.mask)
    ys, xs = np.nonzero(RING.obj.mask)
    centre = (int(ys.mean()), int(xs.mean()))  # the ring's hole
    assert on >= MIN_IOU and off < 0.5 and not RING.obj.mask[centre] and not mask[centre], (on, off)
    stored = accepted(project, RING, regions)
    assert [r["value"]["points"] for r in stored if r["type"] == "polygonlabels"] == \
        [r["value"]["points"] for r in regions]
    note(f"polygon click: IoU {on:.3f} with the ring, {sum(len(r['value']['points']) for r in regions)} points")


def test_a_box_returns_a_polygon_that_label_studio_stores(project):
    h, w = BOX.size
    drag = {**lsrequests.rectangle(*BOX.obj.box, w, h, label="Shape", from_name="drag"), "to_name": "image"}
    regions = polygons(project, BOX, drag)
    assert iou(filled(regions, BOX), BOX.obj.mask) >= MIN_IOU
    assert len(accepted(project, BOX, regions)) == len(regions)
