"""Label Studio's ML-backend wire format as typed structs: the one edge where JSON becomes types.

``/predict`` and ``/setup`` bodies are decoded once, here, and the service takes the structs
as they are. LS sends every task with its annotations and predictions (often hundreds of kB
of brush RLE); ``Task`` declares only ``id`` and ``data``, so msgspec skips the rest without
building Python objects (bench: most of a warm click's parse time). Wrong types fail here
with the JSON path named (``Expected `str | null`, got `object` - at `$.label_config```).

Python callers (``model.py``, the quality harness) build the same structs from dicts with
``predict_request``, so they meet the same checks.
"""

from __future__ import annotations

from typing import Any

import msgspec

from fastsam_backend.errors import BadRequest

NOT_A_JSON_OBJECT = "request body must be a JSON object (Content-Type: application/json)"


class RegionValue(msgspec.Struct, omit_defaults=True):
    """``value`` of a context region; only what prompts read. Percent of the image."""

    x: float | None = None
    y: float | None = None
    width: float | None = None
    height: float | None = None
    rotation: float | None = None
    keypointlabels: list[str] | None = None
    rectanglelabels: list[str] | None = None
    text: list[str] | str | None = None
    positive: bool | None = None  # newer enterprise LS variants put the click's sign here


class Region(msgspec.Struct, omit_defaults=True):
    """A region the annotator just drew with a smart tool (``context.result[i]``)."""

    type: str
    value: RegionValue
    is_positive: bool | None = None
    original_width: float | None = None
    original_height: float | None = None
    from_name: str | None = None
    to_name: str | None = None


class Context(msgspec.Struct):
    result: list[Region] | None = None


class Params(msgspec.Struct):
    context: Context | None = None


class Task(msgspec.Struct):
    id: int | str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class PredictRequest(msgspec.Struct):
    """``POST /predict``. ``context`` None: batch pre-annotation; else an interactive prompt."""

    tasks: list[Task]
    label_config: str | None = None
    params: Params | None = None
    project: str | int | None = None

    @property
    def context(self) -> Context | None:
        return self.params.context if self.params is not None else None

    @property
    def project_id(self) -> str | None:
        return None if self.project is None else str(self.project)


class SetupRequest(msgspec.Struct):
    """``POST /setup``: ``project`` is ``"<id>.<timestamp>"``; ``hostname``/``access_token`` are LS's."""

    project: str | int | None = None
    schema: str | None = None
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] | None = None
    model_version: str | None = None


_PREDICT = msgspec.json.Decoder(PredictRequest)
_SETUP = msgspec.json.Decoder(SetupRequest)


def _decode(decoder: msgspec.json.Decoder, data: bytes, route: str) -> Any:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        if data.lstrip()[:1] != b"{":
            raise BadRequest(NOT_A_JSON_OBJECT) from None
        raise BadRequest(f"invalid {route} body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"{NOT_A_JSON_OBJECT}: {exc}") from None
    except RecursionError:  # msgspec on free-form (``Any``) fields nested thousands deep
        raise BadRequest(f"invalid {route} body: nested too deeply") from None


def decode_predict(data: bytes) -> PredictRequest:
    """Raises BadRequest naming the JSON path of the first wrong value."""
    request = _decode(_PREDICT, data, "/predict")
    if not request.tasks:
        raise BadRequest("tasks must be a non-empty list")
    return request


def decode_setup(data: bytes) -> SetupRequest:
    return _decode(_SETUP, data, "/setup")


def predict_request(tasks: Any, context: Any = None, label_config: Any = None,
                    project: Any = None) -> PredictRequest:
    """The struct for Python callers' dicts, validated as the HTTP body would be."""
    body = {"tasks": tasks, "label_config": label_config, "params": {"context": context}, "project": project}
    try:
        request = msgspec.convert(body, PredictRequest)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid /predict body: {exc}") from None
    if not request.tasks:
        raise BadRequest("tasks must be a non-empty list")
    return request


def context_from(context: Any) -> Context | None:
    """``params.context`` given as plain JSON data (tests, Python callers) → ``Context``."""
    if context is None or isinstance(context, Context):
        return context
    if not isinstance(context, dict):
        raise BadRequest("context must be an object with a 'result' list")
    try:
        return msgspec.convert(context, Context)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc).replace("`$", "`context")) from None
