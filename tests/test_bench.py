"""The benchmark's smoke mode: every section is present in the JSON, RLE is byte-identical.

No timing assertions: CI machines differ. ``python -m bench --quick`` is the real run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.runner import SECTIONS  # every section, so a new one cannot go untested
from fastsam_backend.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.model]
REPO = Path(__file__).resolve().parents[1]
BOOKKEEPING = {"status", "seconds"}


def test_smoke_bench_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke"
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1 and result["machine"]["torch"]
    for name in SECTIONS:
        section = result["sections"][name]
        # a section that errors is a broken benchmark (the warm section once was, unnoticed)
        assert section["status"] in {"ok", "skipped"}, (name, section.get("error"), section.get("traceback"))
        if section["status"] == "skipped":
            assert section["skipped"], name
        else:
            assert set(section) - BOOKKEEPING, f"{name} has no figures"
    rle = result["sections"]["rle"]
    assert rle["status"] == "ok" and rle["byte_identical"] is True
    assert all(m["byte_identical"] for m in rle["masks"].values())
    assert "JSON:" in proc.stdout and "section" in proc.stdout  # the printed table


def test_fastsam_backend_bench_runs_the_checkouts_bench_and_says_so_without_one(monkeypatch, tmp_path):
    """bench/ is not in the wheel: ``fastsam-backend bench`` runs ``python -m bench`` of the checkout
    an editable install points at, and without a checkout it says where the benchmarks are."""
    proc = subprocess.run([sys.executable, "-m", "fastsam_backend", "bench", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--smoke" in proc.stdout, proc.stderr[-2000:]
    from fastsam_backend.cli import commands as cli_commands  # the module whose __file__ locates the checkout

    installed = tmp_path / "site-packages" / "fastsam_backend" / "cli" / "commands.py"
    monkeypatch.setattr(cli_commands, "__file__", str(installed))
    result = CliRunner().invoke(main, ["bench", "--quick"])
    assert result.exit_code == 1 and "pip install -e ." in result.output


def test_the_gpu_batch_report_runs_and_both_rows_warm_every_image(tmp_path):
    """``bench.gpu_batch`` (the lent GPU's throughput report) on the CPU, tiny: both rows time
    the same images through ``batching.warm_batch``, each on a fresh cache."""
    out = tmp_path / "gpu-batch.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_batch", "--images", "3", "--batch", "2", "--imgsz", "320",
                           "--side", "320", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for row, batch in (("one_per_pass", 1), ("batched", 2)):
        assert result[row]["images"] == 3 and result[row]["batch"] == batch
        assert result[row]["images_per_s"] > 0 and result[row]["per_image_ms"]["network"] > 0
    assert result["batched"]["batch_calls"] == 2  # 2 + 1 images
