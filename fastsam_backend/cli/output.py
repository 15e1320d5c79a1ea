"""What the quality commands print besides their tables: the machine line and ``--json-out``."""

from __future__ import annotations

import json
import platform
from typing import Any


def machine() -> str:
    """``x86_64, <processor>``: where a table's figures came from."""
    return f"{platform.machine()}, {platform.processor() or 'cpu'}"


def write_json(path: str | None, data: Any) -> None:
    """``data`` as indented JSON at ``path`` (``--json-out``); nothing when no path was given."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
