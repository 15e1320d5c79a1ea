"""Interactive selections → the answer's LS regions, in the tags ``INTERACTIVE_OUTPUT`` names.

``auto``: a PolygonLabels tag when the config has one and no BrushLabels, the BrushLabels tag
otherwise; ``brush`` / ``polygon``: that tag; ``both``: each of the two the config has.
Polygons keep holes as keyholes (``polygons``), simplified by the project's ``PolygonStyle``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastsam_backend.core.selection import Selection
from fastsam_backend.errors import BadRequest
from fastsam_backend.ls.labelconfig import LabelConfig, OutputTag
from fastsam_backend.ls.polygons import PolygonStyle
from fastsam_backend.ls.regions import brush_regions, crop_polygon_regions
from fastsam_backend.settings import InteractiveOutput


def answer_tags(config: LabelConfig, mode: InteractiveOutput) -> tuple[OutputTag, ...]:
    """The tags an interactive answer is written into.

    Raises:
        BadRequest: the config has no tag of the kind ``mode`` asks for.
    """
    brush, polygon = config.brush, config.polygon
    if mode is InteractiveOutput.AUTO:
        found = polygon if polygon is not None and brush is None else brush
        if found is None:
            raise BadRequest("label_config has no BrushLabels or PolygonLabels tag bound to the image: "
                             "nowhere to put masks")
        return (found,)
    wanted = {InteractiveOutput.BRUSH: (brush,), InteractiveOutput.POLYGON: (polygon,),
              InteractiveOutput.BOTH: (brush, polygon)}[mode]
    tags = tuple(t for t in wanted if t is not None)
    if not tags:
        kinds = {InteractiveOutput.BRUSH: "BrushLabels", InteractiveOutput.POLYGON: "PolygonLabels",
                 InteractiveOutput.BOTH: "BrushLabels or PolygonLabels"}[mode]
        raise BadRequest(f"interactive_output is {mode.value!r} but label_config has no {kinds} tag "
                         "bound to the image: nowhere to put masks")
    return tags


def answer_regions(tags: Sequence[OutputTag], selections: Sequence[Selection],
                   label_of: Callable[[OutputTag], str | None], style: PolygonStyle) -> list[dict[str, Any]]:
    """Per selection, a region in every tag (a polygon tag: one region per connected piece), in
    selection order, each selection's tags in ``tags`` order."""
    if not selections:
        return []
    per_tag: list[list[list[dict[str, Any]]]] = []  # [tag][selection] -> regions
    for tag in tags:
        label = label_of(tag)
        if tag.kind == "brushlabels":  # from the crops, all encoded at once (an exemplar answers 20)
            brushes = brush_regions(tag, selections[0].image_size, [s.box for s in selections],
                                    [s.crop for s in selections], label, [s.score for s in selections])
            per_tag.append([[r] for r in brushes])
        else:
            per_tag.append([crop_polygon_regions(tag, s.image_size, s.box, s.crop, label, s.score, style)
                            for s in selections])
    return [r for k in range(len(selections)) for of_tag in per_tag for r in of_tag[k]]
