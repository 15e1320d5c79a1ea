"""One look at a model host before a download: ``REACH_DEADLINE_S`` in all.

Model libraries retry on their own when there is no network (huggingface_hub ~50 s, ultralytics
several attempts); a request waiting on that froze Label Studio's labeling UI for a minute. One
HEAD request tells an offline machine at once, and the message names the setting to change.
"""

from __future__ import annotations

from fastsam_backend.errors import ModelUnavailable

REACH_DEADLINE_S = 10.0


def require_reachable(url: str, what: str, instead: str) -> None:
    """Raise ModelUnavailable unless ``url`` answers (any HTTP status) within the deadline."""
    import requests

    half = REACH_DEADLINE_S / 2
    try:
        requests.head(url, timeout=(half, half), allow_redirects=False)
    except requests.RequestException as exc:
        raise ModelUnavailable(f"{what} would be downloaded from {url}, which did not answer within "
                               f"{REACH_DEADLINE_S:g} s ({type(exc).__name__}): {instead}") from None
