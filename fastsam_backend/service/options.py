"""Per-project options: the selection/pre-annotation settings a project may override
through /setup's ``extra_params`` (validated like the environment, errors name the field)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fastsam_backend.errors import BadRequest
from fastsam_backend.ls.polygons import PolygonStyle
from fastsam_backend.settings import BoxRule, InteractiveOutput, LabelMode, PointRule, Settings

OVERRIDABLE = (
    "point_rule", "morphology", "text_margin", "preannotate_min_area", "preannotate_max_instances",
    "preannotate_min_score", "label_mode", "label_min_similarity", "default_label",
    "box_rule", "interactive_output", "polygon_tolerance_px", "polygon_max_points",
    "exemplar_tags", "exemplar_min_similarity",
)
# spelled out in model_version itself (service.version_for), not in the overrides digest
SPELLED = {"point_rule", "morphology", "label_config", "box_rule", "interactive_output",
           "polygon_tolerance_px", "polygon_max_points"}
# change interactive answers only (exemplar prompts): never in model_version, which names what
# pre-annotation predicted, so changing them does not make Label Studio predict every task again
INTERACTIVE_ONLY = {"exemplar_tags", "exemplar_min_similarity"}


class ProjectOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    point_rule: PointRule
    morphology: bool
    text_margin: float = Field(ge=0)
    preannotate_min_area: float = Field(ge=0)
    preannotate_max_instances: int = Field(ge=1)
    preannotate_min_score: float = Field(ge=0, le=1)
    label_mode: LabelMode
    label_min_similarity: float
    default_label: str | None = None
    box_rule: BoxRule = BoxRule.FIT
    interactive_output: InteractiveOutput = InteractiveOutput.AUTO
    polygon_tolerance_px: float = Field(1.0, ge=0, le=50)
    polygon_max_points: int = Field(400, ge=8, le=100_000)
    exemplar_tags: tuple[str, ...] = ("similar",)
    exemplar_min_similarity: float = Field(0.3, ge=0, le=1)
    label_config: str | None = None  # /setup's schema, used when /predict omits label_config

    @classmethod
    def defaults(cls, settings: Settings) -> ProjectOptions:
        return cls(**{name: getattr(settings, name) for name in OVERRIDABLE})

    def overrides_digest(self, defaults: ProjectOptions) -> str | None:
        """A short digest of the outputs-changing options that differ from ``defaults`` (None if none;
        the ``SPELLED`` ones are spelled out in the version itself)."""
        mine, base = self.model_dump(mode="json"), defaults.model_dump(mode="json")
        changed = {k: v for k, v in mine.items()
                   if k not in SPELLED and k not in INTERACTIVE_ONLY and base.get(k) != v}
        if not changed:
            return None
        return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]

    @field_validator("exemplar_tags", mode="before")
    @classmethod
    def _tag_names(cls, value: Any) -> Any:
        """``"similar, like_this"`` (the setting) or a list (``extra_params``) -> a tuple of names."""
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @property
    def polygon_style(self) -> PolygonStyle:
        return PolygonStyle(self.polygon_tolerance_px, self.polygon_max_points)

    def with_overrides(self, extra: dict[str, Any] | None, label_config: str | None = None) -> ProjectOptions:
        """A copy with ``extra_params`` applied (unknown keys ignored, bad values → BadRequest)."""
        data = self.model_dump()
        data.update({k: v for k, v in (extra or {}).items() if k in OVERRIDABLE})
        if label_config is not None:
            data["label_config"] = label_config
        try:
            return ProjectOptions.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise BadRequest(f"extra_params.{field}: {first['msg']}") from exc
