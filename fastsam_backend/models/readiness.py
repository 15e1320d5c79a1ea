"""The models of one worker process: loaded in the background as it starts, and what /health says.

Before, the first request after a start loaded the models (6-15 s, and ~47 s of download retries
for CLIP on a machine without network) while Label Studio's labeling UI waited on it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from fastsam_backend.errors import ModelUnavailable
from fastsam_backend.models.clip import ClipScorer
from fastsam_backend.models.segmenter import Segmenter

log = logging.getLogger(__name__)


class Models:
    """The segmenter and CLIP (None: ``CLIP_ENABLED=false``) of this process, and their load."""

    def __init__(self, segmenter: Segmenter, clip: ClipScorer | None, load_wait_s: float) -> None:
        self.segmenter, self.clip, self.load_wait_s = segmenter, clip, load_wait_s
        self._thread: threading.Thread | None = None
        self._clip_warned = False

    def start_loading(self) -> threading.Thread:
        """Load the models in the background now (each worker, after fork); a request that arrives
        meanwhile waits for the load (``wait_until_loaded``)."""
        self._thread = threading.Thread(target=self.load_all, name="fastsam-load", daemon=True)
        self._thread.start()
        return self._thread

    @property
    def loading(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def load_all(self) -> None:
        started = time.perf_counter()
        try:
            self.segmenter.load()
        except ModelUnavailable as exc:
            log.error("FastSAM could not be loaded: %s", exc.message)
        if self.clip is not None:
            self.zero_shot_unavailable()
        log.info("models loaded in %.1f s", time.perf_counter() - started)

    def wait_until_loaded(self) -> None:
        """Block until a background load is over (at most ``LOAD_WAIT_S``, then a 503)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(self.load_wait_s)
            if thread.is_alive():
                raise ModelUnavailable(f"the models are still loading after {self.load_wait_s:g} s "
                                       "(LOAD_WAIT_S); retry in a moment", status=503)

    def require_clip(self) -> ClipScorer:
        if self.clip is None:
            raise ModelUnavailable("CLIP is disabled (CLIP_ENABLED=false): text prompts and zero-shot labels need it")
        self.clip.load()
        return self.clip

    def zero_shot_unavailable(self) -> str | None:
        """Why zero-shot labels are off (None: CLIP is there or can load); loads CLIP if it can."""
        try:
            self.require_clip()
            return None
        except ModelUnavailable as exc:
            if not self._clip_warned:
                self._clip_warned = True
                log.warning("zero-shot labels are off: %s", exc.message)
            return exc.message

    def state(self) -> dict[str, Any]:
        """For /health: ``loading``, ``ready`` or ``error`` (with why), and whether zero-shot labels work."""
        seg = self.segmenter
        if self.loading:
            state: dict[str, Any] = {"state": "loading"}
        elif seg.loaded or (seg.error is None and seg.weights_available()):
            state = {"state": "ready"}
        else:
            state = {"state": "error", "error": seg.error or seg.missing_message()}
        clip = self.clip
        if clip is None:
            state["zero_shot_labels"] = "off: CLIP_ENABLED=false"
        elif clip.loaded:
            state["zero_shot_labels"] = "on"
        elif not clip.available():
            state["zero_shot_labels"] = f"off: {clip.error or 'CLIP cannot be loaded (see the log)'}"
        else:
            state["zero_shot_labels"] = "loading" if self.loading else "available"
        # exemplar prompts compare CLIP crop embeddings too when CLIP works; geometry and colour always
        off = state["zero_shot_labels"]
        state["exemplar_cues"] = ("clip, geometry, colour" if not off.startswith("off")
                                  else f"geometry, colour (without CLIP: {off[len('off: '):]})")
        return state
