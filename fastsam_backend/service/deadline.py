"""A request's deadline, checked between stages: Label Studio gives up on /predict after 100 s and
keeps nothing of it, so a request that cannot finish says so (504, naming the stage) instead."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastsam_backend.errors import DeadlineExceeded


@dataclass
class Deadline:
    seconds: float  # 0: none
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float | None:
        """Seconds left (None: no deadline)."""
        return None if not self.seconds else max(0.0, self.started + self.seconds - time.monotonic())

    def check(self, before: str) -> None:
        """Raise ``DeadlineExceeded`` if the deadline is spent; ``before`` names the next stage."""
        if self.seconds and time.monotonic() - self.started > self.seconds:
            raise DeadlineExceeded(f"the request's deadline (PREDICT_DEADLINE_S={self.seconds:g} s) was spent "
                                   f"before {before}; Label Studio would drop the answer")
