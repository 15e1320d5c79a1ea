"""The ``fastsam-backend`` command (``fastsam_backend.cli:main``, the entry point in pyproject)."""

from fastsam_backend.cli.commands import main

__all__ = ["main"]
