"""Every setting is documented in the README's Configuration table, with its real default."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

from pydantic import AliasChoices

from fastsam_backend.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def documented() -> dict[str, str]:
    """Env name -> the default cell's text, from the rows of the Configuration table."""
    text = README.read_text()
    table = text[text.index("## Configuration"):text.index("## HTTP API")]
    rows: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z0-9_]+)`", cells[0].split("(or")[0])
        defaults = [d.strip().strip("`") for d in cells[1].split(" / ")]
        if len(defaults) != len(names):
            defaults = [cells[1].strip("`")] * len(names)
        rows.update(zip(names, defaults))
    return rows


def env_name(name: str, field) -> str:
    alias = field.validation_alias
    return alias.choices[0] if isinstance(alias, AliasChoices) else name.upper()


def same(cell: str, default) -> bool:
    if default is None:
        return cell == "unset"
    if isinstance(default, bool):
        return cell == str(default).lower()
    if isinstance(default, Enum):
        return cell == default.value
    if isinstance(default, (int, float)):
        mib = re.fullmatch(r"([0-9.]+) MiB", cell)
        return float(mib.group(1)) * 2**20 == default if mib else float(cell) == default
    return cell == str(default)


def test_every_setting_is_in_the_configuration_table_with_its_default():
    rows = documented()
    fields = Settings.model_fields
    missing = [env_name(n, f) for n, f in fields.items() if env_name(n, f) not in rows]
    assert not missing, f"not in README's Configuration table: {missing}"
    wrong = {env_name(n, f): (rows[env_name(n, f)], f.default) for n, f in fields.items()
             if not same(rows[env_name(n, f)], f.default)}
    assert not wrong, f"README default differs from settings.py: {wrong}"
