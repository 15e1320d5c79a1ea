"""Mask quality floors on held-out generated scenes (seeds >= 1_000_000, never used in training),
measured through the request path with the trained FastSAM fixture. `fastsam-backend quality`
prints the full table (docs/quality.md).

The floors are issue #4's targets. The shipped fixture measures 0.916 / 0.920 / 0.930 / 0.966 on
these 16 scenes (0.911 / 0.912 / 0.933 / 0.964 on 96); a regression in prompt parsing,
selection, caching or encoding that costs a few points of IoU fails here."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fastsam_backend.cli import main
from fastsam_backend.quality.evaluation import evaluate, held_out_seeds
from fastsam_backend.service.orchestrator import build_service
from fastsam_backend.settings import PointRule
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ, MODELS

pytestmark = pytest.mark.model  # loads a real model (torch): not in `make test-fast`

SCENES = 16


@pytest.fixture(scope="module")
def report(make_settings):
    service = build_service(make_settings(clip_enabled=False))
    summary = evaluate(service, held_out_seeds(SCENES)).summary()
    print(summary)
    return summary


def test_enough_objects_were_measured(report):
    assert report["point_n"] >= 100 and report["box_n"] >= 50 and report["pos_neg_n"] >= 10


def test_one_positive_click_per_object(report):
    assert report["point_miou"] >= 0.85


def test_box_prompt_equal_to_the_ground_truth_box(report):
    assert report["box_miou"] >= 0.90


def test_positive_and_negative_clicks_separate_overlapping_objects(report):
    assert report["pos_neg_miou"] >= 0.80


def test_everything_mode_recall(report):
    assert report["everything_recall50"] >= 0.90


def test_default_point_rule_is_at_least_as_good_as_the_papers(make_settings, report):
    """On these scenes few masks nest (the failure the default avoids is in test_selection); what
    remains is that the default must not lose to the paper's rule on the suite."""
    service = build_service(make_settings(clip_enabled=False, point_rule=PointRule.PAPER))
    paper = evaluate(service, held_out_seeds(SCENES), everything=False).summary()
    print(f"smallest {report['point_miou']:.4f} / {report['pos_neg_miou']:.4f}, "
          f"paper {paper['point_miou']:.4f} / {paper['pos_neg_miou']:.4f}")
    assert report["point_miou"] >= paper["point_miou"]
    assert report["pos_neg_miou"] >= paper["pos_neg_miou"]


def quality_env(weights, tmp_path, **clip: str) -> dict[str, str]:
    """The environment of the quality command in docs/quality.md: the fixtures, no downloads, no Redis."""
    return {"FASTSAM_WEIGHTS": str(weights), "IMGSZ": str(FIXTURE_IMGSZ), "CONF": str(FIXTURE_CONF),
            "IOU": "0.7", "FASTSAM_ALLOW_DOWNLOAD": "false", "REDIS_URL": "", "MODEL_DIR": str(tmp_path), **clip}


def test_quality_command_prints_every_check_including_text(fastsam_weights, tmp_path):
    """docs/quality.md's table comes from this command; with the CLIP fixture it has the text row."""
    env = quality_env(fastsam_weights, tmp_path, OPEN_CLIP_MODEL=str(MODELS / "clip-shapes.json"),
                      OPEN_CLIP_PRETRAINED=str(MODELS / "clip-shapes.pt"))
    out = tmp_path / "quality.json"
    result = CliRunner().invoke(main, ["quality", "--scenes", "2", "--no-rules", "--json-out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| one positive click per object: IoU", "| box = ground-truth box: IoU",
        "| positive + negative click, overlapping pair: IoU", "| everything mode: recall at IoU 0.5",
        "| text naming exactly one segmented object: top-1"]
    summary = json.loads(out.read_text())["summary"]
    print(summary)
    assert summary["text_n"] > 0 and summary["point_n"] > 0
    # everything mode measures segmentation: CLIP's zero-shot labels (which drop the instances
    # they cannot place, here all but a few: the fixture CLIP never saw "object") must not enter it
    assert summary["everything_recall50"] >= 0.9
    assert f"| {summary['text_top1']:.3f} | {summary['text_n']} |" in rows[-1]


def test_quality_command_without_clip_skips_the_text_row_and_says_why(fastsam_weights, tmp_path):
    env = quality_env(fastsam_weights, tmp_path, OPEN_CLIP_MODEL="ViT-B-32", OPEN_CLIP_PRETRAINED="openai")
    result = CliRunner().invoke(main, ["quality", "--scenes", "1", "--no-rules"], env=env)
    assert result.exit_code == 0, result.output
    assert "text check skipped" in result.output and "top-1" not in result.output
