"""A segmenter that answers with the ground truth of generated scenes, for tests of everything
around the model (HTTP, prompts, cache, selection, regions) without torch or weights.

It is not a model: an image it was not given a scene for has no instances. Tests that judge
masks a model made use the trained fixture through ``segmenter.Segmenter``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable

import numpy as np

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.quality.scenes import Scene


def _pixels_key(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


class GroundTruthSegmenter:
    """``Segmenter``'s surface (``identity``, ``loaded``, ``segment``, …) over known scenes.

    ``segment(pixels)`` returns the visible masks of the scene whose image has exactly these
    pixels, scores falling from 0.99 in drawing order; ``calls`` counts segmentations, so a
    test can tell a cache hit from a computation.
    """

    loaded = True
    error = None
    batches = False  # like ``Segmenter.batches`` on a CPU; a test sets it to take the batched path

    def __init__(self, scenes: Iterable[Scene] = (), identity: str = "ground-truth") -> None:
        self.identity = identity
        self.calls = 0
        self.passes: list[int] = []  # images per ``segment_batch`` call
        self._lock = threading.Lock()
        self._masks: dict[str, MaskSet] = {}
        for scene in scenes:
            self.add(scene)

    def add(self, scene: Scene) -> None:
        dense = np.stack([obj.mask for obj in scene.objects]) if scene.objects else np.zeros((0, 1, 1), bool)
        scores = np.linspace(0.99, 0.5, num=len(scene.objects), dtype=np.float32)
        masks = MaskSet.from_dense(dense, scores) if scene.objects else MaskSet.empty(scene.image.shape[:2])
        self._masks[_pixels_key(scene.image)] = masks

    def weights_available(self) -> bool:
        return True

    def load(self) -> None:
        """Nothing to load."""

    def missing_message(self) -> str:
        return "the ground-truth segmenter needs no weights"

    def segment(self, image: np.ndarray) -> MaskSet:
        """``image``: ``(H, W, 3)`` uint8 RGB, as the service decoded it."""
        with self._lock:
            self.calls += 1
        found = self._masks.get(_pixels_key(image))
        return found if found is not None else MaskSet.empty(image.shape[:2])

    def segment_batch(self, images: list[np.ndarray]) -> list[MaskSet]:
        """``segment`` of each image; ``passes`` records how many came in one call."""
        with self._lock:
            self.passes.append(len(images))
        return [self.segment(image) for image in images]
