"""``FastSAMBackend``: the Label Studio ML backend class, shaped like ``LabelStudioMLBase``.

A thin adapter over ``fastsam_backend.service.FastSAMService`` for code written
against label-studio-ml's model API (``setup`` / ``predict`` / ``fit``). The HTTP
server (``fastsam-backend serve``) uses the same service, so both answer the same.

    backend = FastSAMBackend(label_config=xml)
    backend.predict([task], context={"result": [keypoint_region]})
"""

from __future__ import annotations

from typing import Any

from fastsam_backend.ls.protocol import SetupRequest, predict_request
from fastsam_backend.service.orchestrator import FastSAMService, build_service
from fastsam_backend.settings import Settings, load_settings


class FastSAMBackend:
    """FastSAM for Label Studio: clicks/boxes/text → BrushLabels; no context → pre-annotation."""

    def __init__(self, project_id: str | None = None, label_config: str | None = None,
                 settings: Settings | None = None, service: FastSAMService | None = None) -> None:
        self.project_id = project_id
        self.label_config = label_config
        self.service = service or build_service(settings or load_settings())
        self.setup()

    @property
    def model_version(self) -> str:
        return self.service.project_version(self.project_id)

    def setup(self, hostname: str | None = None, access_token: str | None = None,
              extra_params: dict[str, Any] | None = None) -> str:
        """Configure per-project options; cheap, never loads the model."""
        return self.service.setup(SetupRequest(self.project_id, self.label_config, hostname, access_token,
                                               extra_params))

    def predict(self, tasks: list[dict[str, Any]], context: dict[str, Any] | None = None,
                **kwargs: Any) -> dict[str, Any]:
        """Same shape as label-studio-ml's ``ModelResponse``: one prediction per task."""
        label_config = kwargs.get("label_config") or self.label_config
        predictions = self.service.predict(predict_request(tasks, context, label_config, self.project_id))
        return {"model_version": self.model_version, "predictions": predictions}

    def fit(self, event: str, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Learn from one annotation webhook body in this call and return the summary (the HTTP
        ``/webhook`` answers 202 and learns in the background instead: ``fastsam_backend/jobs/learn.py``)."""
        return self.service.fit(event, data)
