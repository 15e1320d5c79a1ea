"""The scripts that made the shipped fixture models still run, offline, and what they write loads
through the backend's own loaders (so a retrain from their documented commands is possible).

Tiny runs (a few scenes, one epoch / a few steps): the trained quality is the quality suite's
business (tests/test_quality.py); these only keep the scripts from rotting against ultralytics and
open_clip updates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsam_backend.models.clip import ClipConfig, ClipScorer
from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig
from fastsam_backend.quality.scenes import generate_scene

pytestmark = pytest.mark.model  # loads a real model (torch): not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(cwd / "yolo")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(900)
def test_fastsam_training_script_writes_a_one_class_model_the_segmenter_loads(tmp_path):
    out = tmp_path / "tiny.pt"
    stdout = run_script("train_fastsam_fixture.py", "--scenes", "6", "--val-scenes", "2", "--test-scenes", "2",
                        "--epochs", "1", "--imgsz", "160", "--batch", "2", "--nbs", "2", "--workers", "0",
                        "--processes", "1", "--data-dir", str(tmp_path / "data"), "--out", str(out), cwd=tmp_path)
    assert "held-out test (2 scenes" in stdout
    labels = sorted((tmp_path / "data" / "labels" / "train").glob("*.txt"))
    assert len(labels) == 6 and all(line.startswith("0 ") for f in labels for line in f.read_text().splitlines())
    assert out.stat().st_size <= 10e6

    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    assert ckpt["model"].names == {0: "object"} and ckpt.get("optimizer") is None  # FastSAM's one class, stripped
    segmenter = Segmenter(SegmenterConfig(weights=str(out), model_dir=tmp_path, device="cpu", imgsz=160,
                                          conf=0.001, allow_download=False))
    masks = segmenter.segment(generate_scene(1_000_000).image)  # an untrained net: any count, right shape
    assert masks.image_size == generate_scene(1_000_000).image.shape[:2]


@pytest.mark.timeout(900)
def test_clip_training_script_writes_a_model_open_clip_loads_by_its_config_path(tmp_path):
    stdout = run_script("train_clip_fixture.py", "--scenes", "3", "--test-scenes", "2", "--steps", "3",
                        "--batch", "8", "--out-dir", str(tmp_path), cwd=tmp_path)
    assert "after 3 steps" in stdout
    config, weights = tmp_path / "clip-shapes.json", tmp_path / "clip-shapes.pt"
    assert weights.stat().st_size <= 10e6
    scorer = ClipScorer(ClipConfig(model=str(config), pretrained=str(weights), device="cpu", allow_download=False))
    embedded = scorer.embed_texts(["a red circle", "a blue star"])
    assert embedded.shape[0] == 2 and np.allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-3)
