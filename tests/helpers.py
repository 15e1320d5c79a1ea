"""Small helpers shared by tests (not fixtures): the harness's request builders under the names
the tests use."""

from __future__ import annotations

import numpy as np

from fastsam_backend.core.geometry import click_points
from fastsam_backend.quality.evaluation import iou  # noqa: F401 - re-exported for the tests
from fastsam_backend.quality.lsrequests import (  # noqa: F401 - re-exported for the tests
    LABEL_CONFIG,
    captured,
    captured_requests,
    keypoint,
    png_bytes,
)


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """The pixel of ``mask`` farthest from its border, ``(x, y)``."""
    return click_points(mask, np.random.default_rng(0), 0)[0]
