"""The README stays short (the reference lives in docs/, built by ``make docs``), and the label config
on docs/label-studio.md is the README's, the one tests/real_ls loads into Label Studio."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONNECTING = ROOT / "docs" / "label-studio.md"
README_MAX_BYTES = 20_000  # issue #22: at most ~20 KB; what does not fit goes to a docs page


def xml_block_after(text: str, marker: str) -> str:
    """The first fenced ```xml block after ``marker``, its common indentation removed
    (the way tests/real_ls/harness.py reads it)."""
    at = text.find(marker)
    assert at >= 0, f"lost the line {marker!r}"
    found = re.compile(r"```xml\n(.*?)```", re.S).search(text, at)
    assert found, f"no ```xml block after {marker!r}"
    lines = found.group(1).splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:].rstrip() for line in lines).strip()


def test_the_readme_stays_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move reference material to docs/"


def test_the_docs_label_config_is_the_tested_one():
    readme = xml_block_after(README.read_text(), "<!-- label-config: tested by tests/real_ls -->")
    docs = xml_block_after(CONNECTING.read_text(), "<!-- label-config:")
    assert docs == readme, "docs/label-studio.md's label config differs from the README's (the tested one)"
