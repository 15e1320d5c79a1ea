"""The package's imports run one way (issue #22): the layers contract in pyproject.toml
(import-linter), no import cycle between modules, and nothing but the CLI imports the quality
harness. grimp reads every import statement, those inside functions included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def runtime_graph(package: str = "fastsam_backend") -> dict[str, set[str]]:
    """Module -> modules it imports at run time (anywhere in the module; ``TYPE_CHECKING`` blocks,
    which hold annotation-only imports, left out). A package's ``__init__`` counts as the package."""
    graph = grimp.build_graph(package, exclude_type_checking_imports=True, cache_dir=None)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def test_the_cycle_finder_finds_cycles_and_only_them():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"a"}}) == []  # a module importing itself is no cycle between modules


def test_no_import_cycles():
    assert import_cycles(runtime_graph()) == []


def test_only_the_cli_imports_the_quality_harness():
    graph = grimp.build_graph("fastsam_backend", cache_dir=None)
    importers = {m for m in graph.modules if not m.startswith(("fastsam_backend.quality", "fastsam_backend.cli"))
                 and any(i.startswith("fastsam_backend.quality") for i in graph.find_modules_directly_imported_by(m))}
    assert importers == set()


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=cwd,
                          env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_the_layers_contract_holds():
    result = lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("where, line", [
    ("core/masks.py", "from fastsam_backend import server"),  # at the top of the module
    ("ls/rle.py", "def _later():\n    from fastsam_backend.jobs import queues"),  # inside a function
])
def test_an_upward_import_breaks_the_contract(tmp_path, where, line):
    copy = tmp_path / "fastsam_backend"
    shutil.copytree(ROOT / "fastsam_backend", copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / where, "a") as f:
        f.write(f"\n\n{line}  # noqa\n")
    result = lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0
    lower = "fastsam_backend." + where.split("/")[0]
    assert f"{lower} is not allowed to import" in result.stdout, result.stdout


def test_a_cycle_through_a_function_level_import_is_found(tmp_path, monkeypatch):
    copy = tmp_path / "fastsam_backend"
    shutil.copytree(ROOT / "fastsam_backend", copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "core" / "boxmatch.py", "a") as f:  # selection imports boxmatch; now the reverse too
        f.write("\n\ndef _later():\n    from fastsam_backend.core import selection  # noqa\n")
    code = ("import sys; sys.path.append(sys.argv[1]); from tests.test_layering import import_cycles, "
            "runtime_graph; print(import_cycles(runtime_graph()))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert "['fastsam_backend.core.boxmatch', 'fastsam_backend.core.selection']" in out.stdout, out.stderr
