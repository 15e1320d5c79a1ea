"""Editor cost of a brush vs a polygon answer on a 12 MP image (issue #15, item 4), measured once,
outside CI: ``.venv/bin/python -m tests.real_ls.editor_cost [--repeats 3]``.

Starts Label Studio (``.venv-ls``), this tree's backend with the fixture models and headless
Chromium; makes two projects from the README's config (one as it is, one with PolygonLabels in
place of BrushLabels, so ``INTERACTIVE_OUTPUT=auto`` answers with polygons), uploads the same
4000 x 3000 generated scene to each, and clicks the same object: click → suggestion in the
editor's store, and → the next animation frame after it (the editor has drawn it). The first
click of each project warms the backend's cache and is reported apart.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fastsam_backend.quality.scenes import generate_scene

from .browser import Editor, start_chromium
from .cases import Case
from .harness import Backend, LabelStudio, image_bytes, readme_label_config

SEED, SIZE = 1_000_033, (3000, 4000)  # height, width: 12 MP
_NEXT_FRAME = "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(() => done(0)));"


def _target(scene) -> int:
    """The largest object: well inside the view at any zoom."""
    return max(range(len(scene.objects)), key=lambda i: int(scene.objects[i].mask.sum()))


def measure(editor: Editor, project: int, task: int, case: Case, repeats: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(repeats + 1):
        editor.open(project, task)
        editor.auto_annotation()
        editor.smart_tool("key-point-tool")
        editor.label(0, "Banana")
        before = editor.suggestion_ids()
        x, y = case.click()
        since = editor.click_image(x, y)
        stored = editor.wait_suggestion(before, since, timeout_s=180)
        editor.d.execute_async_script(_NEXT_FRAME)
        out.append((stored, time.monotonic() - since))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scene = generate_scene(SEED, SIZE)
    png = image_bytes(scene.image)
    case = Case(SEED, target=_target(scene), neighbour=0)
    object.__setattr__(case, "scene", scene)  # cached_property slot: the 12 MP rendering of the seed
    brush_config = readme_label_config()
    polygon_config = brush_config.replace("BrushLabels", "PolygonLabels")
    with tempfile.TemporaryDirectory() as tmp:
        ls = LabelStudio.start(Path(tmp))
        backend = Backend(Path(tmp), ls).start()
        driver = start_chromium()
        try:
            editor = Editor(driver, ls.url)
            editor.login(ls.user, ls.password)
            for kind, config in (("brush", brush_config), ("polygon", polygon_config)):
                pid = ls.api.create_project(f"editor cost {kind}", config)
                ls.api.json("PATCH", f"/api/projects/{pid}", json={"show_collab_predictions": False})
                task = ls.api.upload(pid, {f"scene-{kind}.png": png})[f"scene-{kind}.png"]["id"]
                ls.api.connect_ml(pid, backend.url)
                first, *rest = measure(editor, pid, task, case, args.repeats)
                result = ls.api.json("GET", "/api/predictions", params={"task": task})
                print(f"{kind}: first click {first[0]:.2f} s (suggestion stored) / {first[1]:.2f} s (drawn); "
                      f"then median {statistics.median(s for s, _ in rest):.2f} / "
                      f"{statistics.median(d for _, d in rest):.2f} s over {len(rest)} "
                      f"({', '.join(f'{s:.2f}/{d:.2f}' for s, d in rest)}); stored predictions {len(result)}")
        finally:
            driver.quit()
            backend.stop()
            ls.stop()


if __name__ == "__main__":
    main()
