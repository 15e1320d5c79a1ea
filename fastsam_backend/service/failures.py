"""``RecentFailures``: the last few ``/predict`` failures of this process, for ``/health``.

Label Studio keeps little of a failed answer (the status line of a 4xx, a log line per error entry
of a batch), so an operator asking "why are there no masks?" reads the reasons here: each entry is
the time, the task id and the message the answer carried (never a request body, URL query or
token: the messages are the ``BackendError``s', written to be shown).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any


class RecentFailures:
    """Thread-safe ring of the last ``size`` failures, with the count since start."""

    def __init__(self, size: int = 10, clock=time.time) -> None:
        self._items: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._clock = clock
        self.total = 0

    def add(self, task_id: Any, message: str, status: int) -> None:
        entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock())),
                 "task": task_id if isinstance(task_id, (int, str)) else None, "status": status,
                 "error": message[:1000]}
        with self._lock:
            self._items.append(entry)
            self.total += 1

    def health(self) -> dict[str, Any]:
        """``{"count": failures since start, "last": [newest first]}``."""
        with self._lock:
            return {"count": self.total, "last": list(reversed(self._items))}
