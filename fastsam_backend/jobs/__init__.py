"""Background work on RQ: the queues, the job functions, batching and prefetch, the worker, and
pre-annotating, learning and training at project scale.

RQ stores each job's function as a dotted path in Redis. The paths of earlier releases
(``fastsam_backend.jobs.warm_image``, ``fastsam_backend.jobs.preannotate_task``) resolve here, so
jobs queued before an upgrade still run (``fastsam_backend.learn_jobs`` and
``fastsam_backend.finetune_job`` are kept as small alias modules for the same reason).
"""

from __future__ import annotations

from typing import Any

_EARLIER_PATHS = {"warm_image", "preannotate_task"}


def __getattr__(name: str) -> Any:
    # resolved on use, so importing the queues alone imports no service (and no model code)
    if name in _EARLIER_PATHS:
        from fastsam_backend.jobs import functions

        return getattr(functions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
