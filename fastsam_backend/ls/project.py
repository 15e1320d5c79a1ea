"""One Label Studio project through label-studio-sdk: its label config, its tasks page by page,
the model versions already predicted on each, and writing a prediction -- with retries.

Transient failures (connection errors, timeouts, HTTP 408/429/5xx) are retried with exponential
backoff (tenacity), at least ``ATTEMPTS`` times and for up to ``RETRY_FOR_S`` -- long enough for a
Label Studio restart; the SDK's own retries are off, so that a POST is never repeated blindly: before a
prediction is sent again, the task is asked whether it holds one of that version already (the
first POST may have landed before its answer was lost). That is what makes a resumed run, or a job
retried after its worker died, leave exactly one prediction per task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import tenacity

log = logging.getLogger(__name__)

PAGE_SIZE = 100
ATTEMPTS = 5  # at least, however quickly they fail
RETRY_FOR_S = 60.0  # a Label Studio restart (migrations checked, gunicorn up) takes tens of seconds


@dataclass(frozen=True)
class LsTask:
    """A task as pre-annotation needs it: its id, its data, the model versions predicted on it."""

    id: int
    data: dict[str, Any]
    model_versions: frozenset[str]
    annotations: tuple[list[Any], ...] = ()  # each accepted (not cancelled) annotation's result list


def transient(exc: BaseException) -> bool:
    """Worth trying again: the network, a timeout, an overloaded or restarting Label Studio."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, ApiError):
        return exc.status_code is None or exc.status_code in (408, 429) or exc.status_code >= 500
    return False


def _retrying(what: str) -> tenacity.Retrying:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        (log.warning if state.attempt_number == 1 else log.info)(
            "Label Studio %s failed (%s); try %d in %.1f s (retrying for up to %.0f s)", what, describe(exc),
            state.attempt_number + 1, state.next_action.sleep if state.next_action else 0, RETRY_FOR_S)

    stop = tenacity.stop_after_attempt(ATTEMPTS) & tenacity.stop_after_delay(RETRY_FOR_S)
    return tenacity.Retrying(retry=tenacity.retry_if_exception(transient), stop=stop,
                             wait=tenacity.wait_exponential(multiplier=0.5, max=8), reraise=True,
                             before_sleep=before_sleep)


def describe(exc: BaseException | None) -> str:
    """A short cause for summaries and logs (never a body that might echo a token)."""
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, ApiError):
        return f"HTTP {exc.status_code}"
    return f"{type(exc).__name__}: {exc}"[:200] if exc is not None else "unknown error"


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    dump = getattr(obj, "model_dump", None) or getattr(obj, "dict", None)
    return dump() if dump is not None else dict(vars(obj))


def _task(raw: Any) -> LsTask:
    """Versions from both of what Label Studio may send: the predictions themselves (``fields=all``)
    and the Data Manager's column ``predictions_model_versions`` -- a display string there
    (``"v1, v2"``, cut at a length limit), a list elsewhere."""
    item = _as_dict(raw)
    versions = {_as_dict(p).get("model_version") for p in item.get("predictions") or [] if p is not None}
    column = item.get("predictions_model_versions")
    versions.update(column.split(",") if isinstance(column, str) else column or [])
    accepted = tuple(list(a.get("result") or []) for a in map(_as_dict, item.get("annotations") or [])
                     if not a.get("was_cancelled") and isinstance(a.get("result"), list))
    return LsTask(int(item["id"]), dict(item.get("data") or {}),
                  frozenset(v.strip() for v in versions if isinstance(v, str) and v.strip()), accepted)


class ProjectClient:
    """``LabelStudio(base_url, api_key)`` narrowed to one project (legacy tokens and personal
    access tokens both work: the SDK exchanges a PAT for access tokens itself)."""

    def __init__(self, url: str, api_key: str, project_id: int, *, timeout_s: float = 30.0) -> None:
        from label_studio_sdk import LabelStudio

        self.url, self.project_id = url.rstrip("/"), int(project_id)
        self._ls = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self._label_config: str | None = None

    def label_config(self) -> str:
        if self._label_config is None:
            project = _retrying("project lookup")(self._ls.projects.get, id=self.project_id)
            self._label_config = str(_as_dict(project).get("label_config") or "")
        return self._label_config

    def page(self, number: int, page_size: int = PAGE_SIZE) -> list[LsTask]:
        """Tasks of page ``number`` (1-based); empty past the last page (LS answers 404 there)."""
        from label_studio_sdk.core.api_error import ApiError

        def fetch() -> list[LsTask]:
            try:
                pager = self._ls.tasks.list(project=self.project_id, page=number, page_size=page_size, fields="all")
            except ApiError as exc:
                if exc.status_code == 404:
                    return []
                raise
            return [_task(t) for t in pager.items or []]

        return _retrying("task listing")(fetch)

    def tasks(self, page_size: int = PAGE_SIZE) -> Iterator[LsTask]:
        number = 1
        while tasks := self.page(number, page_size):
            yield from tasks
            if len(tasks) < page_size:
                return
            number += 1

    def task(self, task_id: int) -> LsTask:
        return _task(_retrying("task lookup")(self._ls.tasks.get, id=str(task_id)))

    def model_versions(self, task_id: int) -> frozenset[str]:
        predictions = _retrying("prediction listing")(self._ls.predictions.list, task=task_id)
        return frozenset(v for v in (_as_dict(p).get("model_version") for p in predictions) if v)

    def write_prediction(self, task_id: int, prediction: dict[str, Any], model_version: str) -> None:
        """POST the prediction; a retry first checks whether the last POST landed after all."""
        for attempt in _retrying("prediction write"):
            with attempt:
                if attempt.retry_state.attempt_number > 1 and model_version in self.model_versions(task_id):
                    return  # the earlier POST was stored; its answer was what got lost
                self._ls.predictions.create(task=task_id, result=prediction["result"],
                                            score=float(prediction.get("score", 0.0)), model_version=model_version)
