"""Content digests of model files: cache keys and ``model_version`` change when a file at the same
path is replaced by another checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(*paths: Path, length: int = 12) -> str:
    """Hex SHA-256 prefix of the files' contents, in order."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:length]
