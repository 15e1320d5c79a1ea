"""The README's "Connect it in Label Studio" steps, with the labeling done in headless Chromium.

Steps 1–4 (project with the README's config, prelabeling off, backend connected with interactive
pre-annotations, images imported) go through the API; step 5 is the annotator's: Auto-Annotation
on, smart tool, label, click / drag / text prompt, accept, Submit. The stored annotation's brush RLE
is then decoded and compared with the scene's ground truth. Click → suggestion times are printed,
never asserted. On a failure the screen, the browser console and the editor state are saved under
``tests/real_ls/artifacts/<test>/``.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

from fastsam_backend.quality.evaluation import iou

from .cases import UI_BOX, UI_EXIF, UI_KEYPOINT, UI_TEXTS, Case, brush_masks, check_mask
from .harness import wait_until

if TYPE_CHECKING:
    from .browser import Editor

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def ui_project(label_studio, backend, label_config):
    api = label_studio.api
    pid = api.create_project("fastsam in the browser", label_config)
    api.json("PATCH", f"/api/projects/{pid}", json={"show_collab_predictions": False})  # README step 2
    files = {c.file_name: c.png() for c in (UI_KEYPOINT, UI_BOX, UI_TEXTS[0])}
    files[UI_EXIF.file_name] = UI_EXIF.jpeg()
    tasks = api.upload(pid, files)
    ml = api.connect_ml(pid, backend.url)
    assert ml["state"] == "CO", ml
    controls = [el.get("name") for el in ET.fromstring(label_config).iter() if el.tag.endswith("Labels")]
    return SimpleNamespace(id=pid, tasks=tasks, api=api, controls=controls)


@pytest.fixture(autouse=True)
def artifacts_on_failure(request, editor, note):
    editor.d.get_log("browser")  # start this test's console log empty
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        folder = ARTIFACTS / request.node.name
        editor.save_artifacts(folder)
        note(f"browser artifacts (screenshot, console log, editor state): {folder}")


def open_task(editor: Editor, ui_project, case: Case) -> int:
    task = ui_project.tasks[case.file_name]["id"]
    editor.open(ui_project.id, task)
    editor.auto_annotation()
    return task


def stored_annotation(ui_project, task: int) -> list[dict]:
    """The submitted annotation's result, read back through the API."""
    found = wait_until(lambda: ui_project.api.json("GET", f"/api/tasks/{task}")["annotations"], 30,
                       f"an annotation on task {task}")
    assert len(found) == 1, f"{len(found)} annotations on task {task}"
    return found[0]["result"]


def assert_prompt_landed(editor: Editor, kind: str, x: float, y: float, w: int, h: int) -> None:
    """The UI's last interactive request carried a ``kind`` region where the test meant to click
    (checks the pixel → screen mapping apart from the backend's answer)."""
    body = editor.interactive_requests()[-1]["body"]
    prompts = [r for r in body["context"]["result"] if r["type"] == kind]
    assert prompts, f"no {kind} region in the UI's request {body}"
    value = prompts[0]["value"]
    assert abs(value["x"] / 100 * w - x) < 2 and abs(value["y"] / 100 * h - y) < 2, \
        f"{kind} at {value['x']:.2f}%, {value['y']:.2f}%; meant pixel {x}, {y} of {w}x{h}"


def click_and_accept(editor: Editor, ui_project, case: Case, label: str = "Banana") -> float:
    editor.smart_tool("key-point-tool")
    editor.label(ui_project.controls.index("click"), label)
    before = editor.suggestion_ids()
    x, y = case.click()
    seconds = editor.wait_suggestion(before, editor.click_image(x, y))
    editor.accept()
    return seconds


def report_times(note, editor: Editor, what: str, seconds: list[float]) -> None:
    """Printed, never asserted; the first prompt of a session includes loading the model."""
    requests = [r["seconds"] for r in editor.interactive_requests() if r["seconds"] is not None]
    ls = ", ".join(f"{s:.2f}" for s in requests[-len(seconds):])
    note(f"{what}: click → suggestion on screen {', '.join(f'{s:.2f}' for s in seconds)} s "
         f"(LS's interactive-annotating request: {ls} s)")


def submit_one_mask(editor: Editor, ui_project, task: int) -> tuple[list[dict], np.ndarray]:
    editor.submit()
    result = stored_annotation(ui_project, task)
    masks = brush_masks(result)
    assert len(masks) == 1, f"{len(masks)} brush regions stored"
    return result, masks[0]


def test_smart_keypoint_click(editor, ui_project, note):
    case = UI_KEYPOINT
    task = open_task(editor, ui_project, case)
    seconds = click_and_accept(editor, ui_project, case, label="Orange")
    report_times(note, editor, "keypoint", [seconds])
    h, w = case.size
    assert_prompt_landed(editor, "keypointlabels", *case.click(), w, h)
    result, mask = submit_one_mask(editor, ui_project, task)
    print(check_mask(mask, case))
    assert [r["value"]["brushlabels"] for r in result if r["type"] == "brushlabels"] == [["Orange"]]


def test_smart_box_drag(editor, ui_project, note):
    case = UI_BOX
    task = open_task(editor, ui_project, case)
    editor.smart_tool("rectangle-tool")
    editor.label(ui_project.controls.index("box"), "Banana")
    x0, y0, x1, y1 = case.obj.box
    before = editor.suggestion_ids()
    seconds = editor.wait_suggestion(before, editor.drag_image(x0 - 2, y0 - 2, x1 + 1, y1 + 1))
    report_times(note, editor, "box", [seconds])
    editor.keep_screen("box-suggestion")
    h, w = case.size
    assert_prompt_landed(editor, "rectanglelabels", x0 - 2, y0 - 2, w, h)
    editor.accept()
    print(check_mask(submit_one_mask(editor, ui_project, task)[1], case))


def test_two_text_prompts_in_a_row(editor, ui_project, note):
    """Without maxSubmissions the prompt stays usable: each text gets its own answer."""
    first, second = UI_TEXTS
    task = open_task(editor, ui_project, first)
    seconds = []
    for case in UI_TEXTS:
        before = editor.suggestion_ids()
        seconds.append(editor.wait_suggestion(before, editor.type_prompt("prompt", case.obj.caption)))
        editor.accept()
    report_times(note, editor, "text", seconds)
    editor.submit()
    result = stored_annotation(ui_project, task)
    texts = [r["value"]["text"] for r in result if r["type"] == "textarea"]
    assert texts == [[first.obj.caption, second.obj.caption]], texts
    masks = brush_masks(result)
    assert len(masks) == 2, f"{len(masks)} brush regions stored for two prompts"
    print(first.obj.caption, "->", check_mask(max(masks, key=lambda m: iou(m, first.obj.mask)), first))
    # LS sends every text of the TextArea so far: the second answer is the second object (the latest text)
    answer = max(masks, key=lambda m: iou(m, second.obj.mask))
    print(second.obj.caption, "->", check_mask(answer, second))


def test_exif_rotated_jpeg_mask_lands_on_the_object_shown(editor, ui_project, note):
    """The file is stored turned 90°, EXIF orientation 6 turns it upright: LS shows it upright, the
    backend applies the orientation too, so the mask must land on the object the annotator sees."""
    case = UI_EXIF
    task = open_task(editor, ui_project, case)
    h, w = case.size
    shown = editor.state()["image"][:2]
    assert shown == [w, h], f"LS shows the image {shown[0]}x{shown[1]}, upright it is {w}x{h}"
    seconds = click_and_accept(editor, ui_project, case)
    report_times(note, editor, "EXIF-rotated keypoint", [seconds])
    assert_prompt_landed(editor, "keypointlabels", *case.click(), w, h)
    print(check_mask(submit_one_mask(editor, ui_project, task)[1], case))


def test_smart_tools_on_a_pre_annotated_task(editor, ui_project, backend, label_config, note):
    """README "Smart tools on pre-annotated tasks": with prelabeling on, the task opens with its
    prediction's regions as the annotation. Brush regions let a smart-tool click through (seen in
    LS 1.23.2), but a click inside a predicted rectangle or polygon selects that region instead of
    placing a keypoint. Ctrl+H hides every region; the click then reaches the image, the backend's
    suggestion arrives, and the submitted annotation keeps the predicted regions beside it."""
    case = dataclasses.replace(UI_KEYPOINT, copy="-pre")
    api = ui_project.api
    pid = api.create_project("fastsam pre-annotated, smart tools", label_config)  # prelabeling on: LS's default
    task = api.upload(pid, {case.file_name: case.png()})[case.file_name]["id"]
    api.connect_ml(pid, backend.url)
    api.retrieve_predictions(pid)  # brush regions; add the object's box, as a detector's pre-annotation would
    h, w = case.size
    x0, y0, x1, y1 = case.obj.box
    value = {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w, "height": 100 * (y1 - y0) / h,
             "rotation": 0, "rectanglelabels": ["Banana"]}
    box = {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": w,
           "original_height": h, "value": value}
    first = api.predictions(task)[0]
    api.json("PATCH", f"/api/predictions/{first['id']}", json={"result": first["result"] + [box]})
    predicted = api.predictions(task)
    assert len(predicted) == 1 and predicted[0]["result"], "Retrieve Predictions stored no prediction"

    editor.open(pid, task)
    regions = wait_until(lambda: editor.state()["regions"], 30, "the prediction's regions in the editor")
    assert len(regions) == len(predicted[0]["result"]), "prelabeling did not show the prediction's regions"
    editor.auto_annotation()
    editor.smart_tool("key-point-tool")
    editor.label(ui_project.controls.index("click"), "Orange")
    sent = len(editor.interactive_requests())
    editor.click_image(*case.click())  # the problem: this selects the predicted region under the click
    editor.wait(10).until(lambda d: editor.state()["selected"])
    assert len(editor.interactive_requests()) == sent, "the click on a predicted region reached the backend"
    ActionChains(editor.d).send_keys(Keys.ESCAPE).perform()
    editor.wait(10).until(lambda d: not editor.state()["selected"])
    editor.toggle_all_regions()
    editor.wait(10).until(lambda d: all(hidden for _, _, hidden in editor.state()["regions"]))
    seconds = click_and_accept(editor, ui_project, case, label="Orange")
    report_times(note, editor, "keypoint on a pre-annotated task", [seconds])
    editor.submit()
    result = stored_annotation(SimpleNamespace(api=api), task)
    assert len(result) == len(regions) + 1, "the predicted regions + the accepted suggestion"
    assert len(brush_masks(result)) == len(brush_masks(predicted[0]["result"])) + 1
    print(check_mask(max(brush_masks(result), key=lambda m: iou(m, case.obj.mask)), case))
