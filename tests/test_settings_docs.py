"""Every setting is documented in the docs' settings table (docs/configuration.md), with its real
default; the README's short table names only real settings, with their real defaults."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

from pydantic import AliasChoices

from fastsam_backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
README = ROOT / "README.md"


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a ``## `` line) up to the next ``## `` heading."""
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + len(heading) + 2)
    return text[start:] if end < 0 else text[start:end]


def table_rows(text: str) -> dict[str, str]:
    """Env name -> the default cell's text, from the rows of a ``| variable | default | … |`` table."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z0-9_]+)`", cells[0].split("(or")[0])
        defaults = [d.strip().strip("`") for d in cells[1].split(" / ")]
        if len(defaults) != len(names):
            defaults = [cells[1].strip("`")] * len(names)
        rows.update(zip(names, defaults))
    return rows


def documented() -> dict[str, str]:
    """The rows of docs/configuration.md's settings table."""
    return table_rows(section(CONFIGURATION.read_text(), "## Settings"))


def readme_short_table() -> dict[str, str]:
    """The rows of the README's table of the settings people change most."""
    return table_rows(section(README.read_text(), "## Settings people change most"))


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
    assert not missing, f"not in docs/configuration.md's settings table: {missing}"
    wrong = {env_name(n, f): (rows[env_name(n, f)], f.default) for n, f in fields.items()
             if not same(rows[env_name(n, f)], f.default)}
    assert not wrong, f"docs/configuration.md's default differs from settings.py: {wrong}"


def test_the_readme_lists_only_real_settings_with_their_defaults():
    rows = readme_short_table()
    assert len(rows) >= 8, f"the README's settings table lost its rows: {sorted(rows)}"
    fields = {env_name(n, f): f for n, f in Settings.model_fields.items()}
    unknown = sorted(set(rows) - set(fields))
    assert not unknown, f"the README's settings table names what is not a setting: {unknown}"
    wrong = {name: (cell, fields[name].default) for name, cell in rows.items()
             if not same(cell, fields[name].default)}
    assert not wrong, f"README default differs from settings.py: {wrong}"
