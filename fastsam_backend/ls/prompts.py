"""Label Studio's interactive ``context`` → typed prompts.

Coordinates in LS regions are percent of the image; prompts keep percent and turn
into pixels only against the decoded image's real size (``in_pixels``), so a
region whose ``original_width`` disagrees with the file still lands right.

Each click and box keeps the tool (``from_name``) it was drawn with. Those drawn with an exemplar
tool (``EXEMPLAR_TAGS``, see ``LabelConfig.exemplar_tools``) are kept apart, as ``exemplar_points``
and ``exemplar_boxes``: they mark objects of the kind wanted (a negative click: a kind not wanted),
not the object to answer.

A keypoint without ``is_positive`` (older LS, API clients) is a *positive* click:
that is what a plain click means in the LS UI, and Alt-click sends ``false``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastsam_backend.errors import BadRequest
from fastsam_backend.ls.protocol import Context, Region

# CLIP reads 77 tokens (a few hundred characters); far longer texts only cost tokenizer time
MAX_TEXT_CHARS = 1000
POINT_TYPES = {"keypointlabels", "keypoint"}
BOX_TYPES = {"rectanglelabels", "rectangle"}
TEXT_TYPES = {"textarea"}


@dataclass(frozen=True)
class PointPrompt:
    """A click. ``x``, ``y`` in percent of the image width/height (0–100)."""

    x: float
    y: float
    positive: bool = True
    label: str | None = None
    tool: str | None = None  # the region's from_name

    def in_pixels(self, width: int, height: int) -> tuple[int, int]:
        """Pixel column and row, clamped into the image."""
        return int(_clamp(self.x / 100.0 * width, 0, width - 1)), int(_clamp(self.y / 100.0 * height, 0, height - 1))


@dataclass(frozen=True)
class BoxPrompt:
    """A dragged box, axis-aligned, in percent: ``x0, y0`` top-left, ``x1, y1`` bottom-right."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None = None
    tool: str | None = None  # the region's from_name

    def in_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``x0, y0, x1, y1`` pixels, clamped to the image, exclusive end, at least 1 px."""
        x0 = math.floor(_clamp(self.x0 / 100.0 * width, 0, width - 1))
        y0 = math.floor(_clamp(self.y0 / 100.0 * height, 0, height - 1))
        x1 = math.ceil(_clamp(self.x1 / 100.0 * width, x0 + 1, width))
        y1 = math.ceil(_clamp(self.y1 / 100.0 * height, y0 + 1, height))
        return x0, y0, x1, y1


@dataclass(frozen=True)
class TextPrompt:
    text: str


@dataclass(frozen=True)
class Prompts:
    """Everything the annotator just drew, grouped by kind; exemplar-tool regions apart."""

    points: tuple[PointPrompt, ...] = ()
    boxes: tuple[BoxPrompt, ...] = ()
    texts: tuple[TextPrompt, ...] = ()
    exemplar_points: tuple[PointPrompt, ...] = ()
    exemplar_boxes: tuple[BoxPrompt, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.points or self.boxes or self.texts or self.exemplar_points or self.exemplar_boxes)

    @property
    def has_exemplars(self) -> bool:
        """Whether an exemplar was marked: a box or a positive click with an exemplar tool."""
        return bool(self.exemplar_boxes) or any(p.positive for p in self.exemplar_points)

    @property
    def exemplar_label(self) -> str | None:
        """The label chosen on the exemplar tool (its boxes first, then its positive clicks)."""
        for prompt in (*self.exemplar_boxes, *(p for p in self.exemplar_points if p.positive)):
            if prompt.label:
                return prompt.label
        return None

    @property
    def label(self) -> str | None:
        """The first label chosen on a smart tool (boxes first, then points)."""
        for prompt in (*self.boxes, *self.points):
            if prompt.label:
                return prompt.label
        return None


def _clamp(value: float, low: float, high: float) -> float:
    """``value`` within ``[low, high]``; huge percentages (1e308 overflows to inf in pixels) and NaN
    (inf - inf in a rotated box) land on an edge instead of failing ``int()``."""
    return low if value != value else min(max(value, low), high)


def _size_or(value: float | None, default: float) -> float:
    """A region's ``original_width``/``height`` when it is a positive finite number, else ``default``."""
    return float(value) if value is not None and math.isfinite(value) and value > 0 else default


def _number(value: float | None, where: str) -> float:
    if value is None or not math.isfinite(value):
        raise BadRequest(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _first(labels: list[str] | None) -> str | None:
    return labels[0] if labels else None


def _point(region: Region, where: str) -> PointPrompt:
    value = region.value
    positive = region.is_positive if region.is_positive is not None else value.positive
    return PointPrompt(
        x=_number(value.x, f"{where}.value.x"),
        y=_number(value.y, f"{where}.value.y"),
        positive=True if positive is None else positive,
        label=_first(value.keypointlabels),
        tool=region.from_name,
    )


def _box(region: Region, where: str) -> BoxPrompt:
    value = region.value
    x = _number(value.x, f"{where}.value.x")
    y = _number(value.y, f"{where}.value.y")
    w = _number(value.width, f"{where}.value.width")
    h = _number(value.height, f"{where}.value.height")
    if w < 0 or h < 0:
        raise BadRequest(f"{where}.value width/height must not be negative")
    rotation = _number(value.rotation or 0.0, f"{where}.value.rotation")
    label = _first(value.rectanglelabels)
    if rotation % 360 == 0:
        return BoxPrompt(x, y, x + w, y + h, label, region.from_name)
    # LS rotates about the top-left corner; the prompt is the rotated box's axis-aligned hull.
    # Percent units differ per axis, so rotate in pixel-proportional units of the original size.
    ow = _size_or(region.original_width, 100.0)
    oh = _size_or(region.original_height, 100.0)
    theta = math.radians(rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    corners = [(0.0, 0.0), (w * ow, 0.0), (w * ow, h * oh), (0.0, h * oh)]
    xs = [x + (cx * cos - cy * sin) / ow for cx, cy in corners]
    ys = [y + (cx * sin + cy * cos) / oh for cx, cy in corners]
    return BoxPrompt(min(xs), min(ys), max(xs), max(ys), label, region.from_name)


def _text(region: Region, where: str) -> TextPrompt | None:
    texts = region.value.text
    if isinstance(texts, str):
        texts = [texts]
    # LS sends every text submitted so far in this TextArea, oldest first: the prompt is the latest
    latest = next((t.strip() for t in reversed(texts or []) if t.strip()), "")
    if len(latest) > MAX_TEXT_CHARS:
        raise BadRequest(f"{where}.value.text: text prompt is {len(latest)} characters long; "
                         f"at most {MAX_TEXT_CHARS} are accepted (CLIP reads only the first few hundred)")
    return TextPrompt(latest) if latest else None


def parse_context(context: Context | None, exemplar_tools: frozenset[str] = frozenset()) -> Prompts:
    """Typed ``params.context`` → prompts; ``None`` (batch mode) gives empty prompts.

    Clicks and boxes whose ``from_name`` is in ``exemplar_tools`` become exemplar prompts.

    Types were checked where the body was decoded (``protocol``); what is left are the values:
    finite coordinates, non-negative sizes.

    Raises:
        BadRequest: naming the offending field, e.g. ``context.result[0].value.x``.
    """
    if context is None or not context.result:
        return Prompts()
    points: list[PointPrompt] = []
    boxes: list[BoxPrompt] = []
    texts: list[TextPrompt] = []
    ex_points: list[PointPrompt] = []
    ex_boxes: list[BoxPrompt] = []
    for i, region in enumerate(context.result):
        where = f"context.result[{i}]"
        kind = region.type.lower()
        exemplar = region.from_name is not None and region.from_name in exemplar_tools
        if kind in POINT_TYPES:
            (ex_points if exemplar else points).append(_point(region, where))
        elif kind in BOX_TYPES:
            (ex_boxes if exemplar else boxes).append(_box(region, where))
        elif kind in TEXT_TYPES and (text := _text(region, where)) is not None:
            texts.append(text)
        # other tools' regions (brush strokes, choices) are not prompts
    return Prompts(tuple(points), tuple(boxes), tuple(texts), tuple(ex_points), tuple(ex_boxes))
