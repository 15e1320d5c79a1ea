"""The project's label config (XML) → where our regions go and which labels exist.

Parsed once per distinct config string (LS sends the whole XML with every
``/predict``), so the click path does a dictionary lookup, not an XML parse.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache

from fastsam_backend.errors import BadRequest

OUTPUT_KINDS = ("brushlabels", "polygonlabels", "rectanglelabels")
# Smart tags the annotator prompts with. A smart RectangleLabels is also an output kind (where
# pre-annotation never writes); a KeyPointLabels only ever prompts, so it is a tool and no output.
TOOL_KINDS = ("keypointlabels", "rectanglelabels")
IMAGE_TAGS = {"image"}


@dataclass(frozen=True)
class OutputTag:
    """A labels tag we can write regions into (``<BrushLabels name=.. toName=..>``)."""

    kind: str  # "brushlabels" | "polygonlabels" | "rectanglelabels"
    from_name: str
    to_name: str
    labels: tuple[str, ...]
    smart: bool = False  # a prompt tool (smart="true"), not a pre-annotation target
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def match_label(self, label: str | None) -> str | None:
        """``label`` as spelled in this tag (case-insensitive), or None if it has no such label."""
        if not label:
            return None
        wanted = label.strip().casefold()
        return next((value for value in self.labels if value.casefold() == wanted), None)


@dataclass(frozen=True)
class LabelConfig:
    image_name: str  # the <Image name=..>
    image_key: str  # task.data key of the image ("image" for value="$image")
    outputs: tuple[OutputTag, ...]
    tools: tuple[OutputTag, ...] = ()  # smart KeyPointLabels / RectangleLabels bound to the image

    @property
    def brush(self) -> OutputTag | None:
        return next((o for o in self.outputs if o.kind == "brushlabels"), None)

    @property
    def polygon(self) -> OutputTag | None:
        return next((o for o in self.outputs if o.kind == "polygonlabels"), None)

    def exemplar_tools(self, names: tuple[str, ...]) -> frozenset[str]:
        """The ``from_name`` of each smart tool named in ``names`` (``EXEMPLAR_TAGS``): regions drawn
        with them are exemplars. A name of no smart tool (a brush tag, a typo) marks nothing."""
        wanted = set(names)
        return frozenset(t.from_name for t in self.tools if t.from_name in wanted)

    def pre_annotation_targets(self) -> tuple[OutputTag, ...]:
        """Output tags for prompt-less pre-annotation: every non-smart labels tag (a smart
        RectangleLabels is the annotator's prompt tool, not a place for boxes), else the brush."""
        targets = tuple(o for o in self.outputs if not o.smart)
        return targets or tuple(o for o in self.outputs if o.kind == "brushlabels")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"true", "1", "yes"}


@lru_cache(maxsize=64)
def parse_label_config(xml: str) -> LabelConfig:
    """Parse a label config.

    Raises:
        BadRequest: not XML, no ``<Image>``, or no BrushLabels/PolygonLabels/RectangleLabels bound to it.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise BadRequest("label_config is missing: LS sends the project's labeling config with /predict")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise BadRequest(f"label_config is not valid XML: {exc}") from exc

    images = [el for el in root.iter() if el.tag.lower() in IMAGE_TAGS]
    if not images:
        raise BadRequest("label_config has no <Image> tag")
    image = images[0]
    image_name = image.get("name") or "image"
    value = image.get("value") or "$image"
    image_key = value[1:] if value.startswith("$") else value

    outputs, tools = [], []
    for el in root.iter():
        kind = el.tag.lower()
        if kind not in OUTPUT_KINDS and kind not in TOOL_KINDS:
            continue
        to_name = el.get("toName") or ""
        if image_name not in to_name.split(","):
            continue
        labels, synonyms = [], {}
        for label in el:
            if label.tag.lower() != "label":
                continue
            name = label.get("value") or label.get("alias")
            if not name:
                continue
            labels.append(name)
            extra = label.get("predicted_values") or ""
            synonyms[name] = tuple(s.strip() for s in extra.split(",") if s.strip())
        tag = OutputTag(
            kind=kind,
            from_name=el.get("name") or kind,
            to_name=image_name,
            labels=tuple(labels),
            smart=_truthy(el.get("smart")) or _truthy(el.get("smartOnly")),
            synonyms=synonyms,
        )
        if kind in OUTPUT_KINDS:
            outputs.append(tag)
        if kind in TOOL_KINDS and tag.smart:
            tools.append(tag)
    if not outputs:
        raise BadRequest(
            f"label_config has no BrushLabels, PolygonLabels or RectangleLabels tag with toName=\"{image_name}\""
        )
    return LabelConfig(image_name, image_key, tuple(outputs), tuple(tools))
