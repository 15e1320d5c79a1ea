"""Label Studio's labeling UI in headless Chromium (selenium; /usr/bin/chromium + chromedriver).

Everything waits on the editor's state (``window.Htx.annotationStore.selected``: its regions and
suggestions) or on elements, never on fixed sleeps. See /work/shared/notes/ls-browser.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1250", "--disable-gpu")

_STATE = """
const a = window.Htx && window.Htx.annotationStore && window.Htx.annotationStore.selected;
if (!a) return null;
const img = a.names.get(arguments[0]);
return {regions: a.regions.map(r => [r.type, r.id, !!r.hidden]),
        suggestions: [...a.suggestions.values()].map(r => r.id), selected: a.selectedRegions.map(r => r.id),
        image: img ? [img.naturalWidth, img.naturalHeight, img.stageWidth, img.stageHeight, img.zoomScale,
                      img.zoomingPositionX || 0, img.zoomingPositionY || 0] : null};
"""


def start_chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class Editor:
    """One browser logged in to one Label Studio; ``open`` a task, then act as an annotator."""

    def __init__(self, driver: webdriver.Chrome, ls_url: str, image_name: str = "image") -> None:
        self.d, self.url, self.image_name = driver, ls_url, image_name
        self.perf: list[dict] = []

    def wait(self, timeout_s: float = 60, poll_s: float = 0.05) -> WebDriverWait:
        return WebDriverWait(self.d, timeout_s, poll_frequency=poll_s)

    def login(self, email: str, password: str) -> None:
        self.d.get(f"{self.url}/user/login/")
        self.d.find_element(By.NAME, "email").send_keys(email)
        self.d.find_element(By.NAME, "password").send_keys(password)
        self.d.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        self.wait().until(lambda d: "/user/login" not in d.current_url)

    def state(self) -> dict | None:
        return self.d.execute_script(_STATE, self.image_name)

    def open(self, project: int, task: int) -> None:
        """The labeling view of a task, once the image is drawn and the editor is idle."""
        self.d.get(f"{self.url}/projects/{project}/data?task={task}")
        self.wait(120).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".konvajs-content")))
        self.wait(120).until(lambda d: (s := self.state()) and s["image"] and s["image"][0] and s["image"][2])

    def auto_annotation(self) -> None:
        toggle = self.d.find_element(By.CSS_SELECTOR, '[data-testid="bottombar-auto-annotation-toggle"]')
        if not toggle.is_selected():
            self.d.execute_script("arguments[0].click()", toggle)
        self.wait(10).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".lsf-toolbar button.lsf-tool_smart")))

    def smart_tool(self, aria_label: str, nth: int = 0) -> None:
        """Hover the toolbar's smart-tools button, pick ``key-point-tool`` / ``rectangle-tool``.
        Each smart labels tag has its own tool, in config order: ``nth`` picks the tool of the
        ``nth`` tag of that kind (the README's second RectangleLabels, ``similar``: ``nth=1``); a
        label of another tag than the tool's deselects the tool (seen in LS 1.23.2)."""
        group = self.d.find_element(By.CSS_SELECTOR, ".lsf-toolbar button.lsf-tool_smart")
        ActionChains(self.d).move_to_element(group).perform()
        selector = f'.lsf-toolbar__smart button[aria-label="{aria_label}"]'
        self.wait(10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, selector)) > nth)
        tool = self.d.find_elements(By.CSS_SELECTOR, selector)[nth]
        self.wait(10).until(lambda d: tool.is_displayed() and tool.is_enabled())
        tool.click()

    def label(self, control_index: int, value: str) -> None:
        """Pick ``value`` in the ``control_index``-th labels control of the config (0 = first)."""
        control = self.d.find_elements(By.CSS_SELECTOR, ".lsf-labels")[control_index]
        found = [el for el in control.find_elements(By.CSS_SELECTOR, ".lsf-label") if el.text.split("\n")[0] == value]
        assert found, f"no label {value!r} in labels control #{control_index}"
        found[0].click()
        self.wait(10).until(lambda d: "lsf-label_selected" in found[0].get_attribute("class"))

    def to_screen(self, x: float, y: float) -> tuple[int, int]:
        """Image pixel (centre of ``x, y``) → viewport coordinates (the canvas is scaled to fit)."""
        canvas = self.d.find_element(By.CSS_SELECTOR, ".konvajs-content")
        left, top = self.d.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.x, r.y]", canvas)
        nat_w, nat_h, stage_w, stage_h, zoom, off_x, off_y = self.state()["image"]
        return (round(left + off_x + (x + 0.5) * stage_w * zoom / nat_w),
                round(top + off_y + (y + 0.5) * stage_h * zoom / nat_h))

    def _pointer(self) -> ActionChains:
        return ActionChains(self.d, duration=50)

    def click_image(self, x: int, y: int) -> float:
        sx, sy = self.to_screen(x, y)
        chain = self._pointer()
        chain.w3c_actions.pointer_action.move_to_location(sx, sy)
        chain.w3c_actions.pointer_action.click()
        chain.perform()
        return time.monotonic()

    def drag_image(self, x0: int, y0: int, x1: int, y1: int) -> float:
        (sx0, sy0), (sx1, sy1) = self.to_screen(x0, y0), self.to_screen(x1, y1)
        chain = self._pointer()
        pointer = chain.w3c_actions.pointer_action
        pointer.move_to_location(sx0, sy0)
        pointer.pointer_down()
        for k in range(1, 5):
            pointer.move_to_location(sx0 + (sx1 - sx0) * k // 4, sy0 + (sy1 - sy0) * k // 4)
        pointer.pointer_up()
        chain.perform()
        return time.monotonic()

    def type_prompt(self, name: str, text: str) -> float:
        box = self.d.find_element(By.CSS_SELECTOR, f'[data-testid="textarea-input"][name="{name}"]')
        box.send_keys(text)
        box.send_keys(Keys.ENTER)
        return time.monotonic()

    def toggle_all_regions(self) -> None:
        """Ctrl+H, LS's "Toggle all regions visibility" hotkey: hidden regions take no clicks, so
        the smart tools reach the image under them."""
        ActionChains(self.d).key_down(Keys.CONTROL).send_keys("h").key_up(Keys.CONTROL).perform()

    def suggestion_ids(self) -> set[str]:
        return set(self.state()["suggestions"])

    def wait_suggestion(self, before: set[str], since: float, timeout_s: float = 60) -> float:
        """Seconds from ``since`` until a suggestion not in ``before`` is in the editor."""
        self.wait(timeout_s, 0.02).until(lambda d: set(self.state()["suggestions"]) - before)
        return time.monotonic() - since

    def accept(self) -> None:
        self.d.find_element(By.CSS_SELECTOR, '[data-testid="bottombar-accept-suggestions-button"]').click()
        self.wait(10).until(lambda d: not self.state()["suggestions"])

    def submit(self) -> None:
        self.d.find_element(By.CSS_SELECTOR, '[data-testid="bottombar-submit-button"]').click()

    def _network(self) -> list[dict]:
        for entry in self.d.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] in ("Network.requestWillBeSent", "Network.loadingFinished"):
                self.perf.append(message)
        return self.perf

    def interactive_requests(self) -> list[dict]:
        """The UI's ``interactive-annotating`` requests so far: ``{"body": {...}, "seconds": float}``."""
        sent, finished = {}, {}
        for m in self._network():
            params = m["params"]
            if m["method"] == "Network.requestWillBeSent" and "interactive-annotating" in params["request"]["url"]:
                sent[params["requestId"]] = params
            elif m["method"] == "Network.loadingFinished":
                finished[params["requestId"]] = params["timestamp"]
        return [{"body": json.loads(p["request"].get("postData") or "null"),
                 "seconds": finished[rid] - p["timestamp"] if rid in finished else None} for rid, p in sent.items()]

    def keep_screen(self, name: str) -> Path:
        """The window as it is now, kept as ``artifacts/screens/<name>.png`` (the docs' pictures
        come from these: copied into docs/img by hand, never written by a test run)."""
        path = Path(__file__).parent / "artifacts" / "screens" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.d.save_screenshot(str(path))
        return path

    def save_artifacts(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.d.save_screenshot(str(folder / "screen.png"))
        console = [f"{e['level']} {e['message']}" for e in self.d.get_log("browser")]
        (folder / "console.log").write_text("\n".join(console) + "\n")
        (folder / "editor-state.json").write_text(json.dumps(self.state(), indent=1) + "\n")
        (folder / "url.txt").write_text(self.d.current_url + "\n")
