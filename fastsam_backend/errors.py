"""Exceptions that carry an HTTP status; the server turns them into JSON errors.

Anything else raised while serving is a bug: logged with a request id, answered
with a short 500.
"""

from __future__ import annotations


class BackendError(Exception):
    """An expected failure with a message safe to show to the Label Studio user."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The HTTP status line's reason phrase: Label Studio shows only that ("Reason: 422 Client Error:
        # <reason> for url: .../setup") on Validate and Save, not the JSON body.
        self.reason = reason
        if status is not None:
            self.status = status


class BadRequest(BackendError):
    """The request body (tasks, context, label config) is malformed."""

    status = 400


class ImageError(BackendError):
    """The task's image could not be fetched or decoded (message names host and cause)."""

    status = 422


class ModelUnavailable(BackendError):
    """Weights are missing or failed to load; the message says which file and how to get it."""

    status = 503
