"""CLIP's image tower on ONNX Runtime (``CLIP_RUNTIME``, issue #25): exported once into MODEL_DIR,
served when its embeddings match torch's, under torch's identity; every failure named."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fastsam_backend.errors import ModelUnavailable
from fastsam_backend.models.clip import ClipConfig, ClipScorer
from fastsam_backend.quality.evaluation import TEST_SEED0
from fastsam_backend.quality.fake import GroundTruthSegmenter
from fastsam_backend.quality.scenes import generate_scene

pytestmark = pytest.mark.model
MODELS = Path(__file__).parent / "fixtures" / "models"


def _scorer(model_dir: Path, **options) -> ClipScorer:
    return ClipScorer(ClipConfig(model=str(MODELS / "clip-shapes.json"), pretrained=str(MODELS / "clip-shapes.pt"),
                                 device="cpu", model_dir=model_dir, threads=1, **options))


def _embeddings(scorer: ClipScorer) -> np.ndarray:
    scene = generate_scene(TEST_SEED0 + 2)
    return scorer.embed_masks(scene.image, GroundTruthSegmenter([scene]).segment(scene.image)).astype(np.float32)


def test_auto_serves_the_onnx_export_with_torchs_embeddings_under_torchs_identity(tmp_path):
    served, reference = _scorer(tmp_path), _scorer(tmp_path / "unused", runtime="torch")
    served.load()
    assert served.runtime == "onnxruntime" and reference.identity == served.identity
    exports = sorted(p.name for p in tmp_path.iterdir())
    assert exports == [f"{served.identity}-visual.onnx", f"{served.identity}-visual.onnx.json"]
    ours, theirs = _embeddings(served), _embeddings(reference)
    assert reference.runtime == "torch" and ours.any()
    assert np.abs(ours - theirs).max() <= 2e-3  # float16 storage of the same numbers
    phrases = ["red circle", "a big blue ring", "star"]
    assert np.abs(served.embed_texts(phrases) - reference.embed_texts(phrases)).max() <= 1e-5
    export = tmp_path / exports[0]
    made = export.stat().st_mtime_ns
    again = _scorer(tmp_path)
    again.load()  # another worker sharing MODEL_DIR: the export and its verdict are reused
    assert again.runtime == "onnxruntime" and export.stat().st_mtime_ns == made


def test_a_model_dir_that_cannot_be_written_runs_torch_under_auto_and_is_an_error_under_onnx(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        scorer = _scorer(blocked)
        scorer.load()
    assert scorer.runtime == "torch" and "MODEL_DIR" in caplog.text
    with pytest.raises(ModelUnavailable, match=r"CLIP_RUNTIME=onnx.*MODEL_DIR"):
        _scorer(blocked, runtime="onnx").load()


def test_an_export_whose_embeddings_differ_is_not_served(tmp_path, monkeypatch, caplog):
    from fastsam_backend.models import clip_runtime

    monkeypatch.setattr(clip_runtime, "CHECK_MAX_ABS", -1.0)  # no export can agree
    with caplog.at_level(logging.WARNING):
        scorer = _scorer(tmp_path)
        scorer.load()
    assert scorer.runtime == "torch" and "differ from torch's" in caplog.text
    with pytest.raises(ModelUnavailable, match="differ from torch's"):
        _scorer(tmp_path, runtime="onnx").load()


def test_int8_is_onnx_runtimes_with_its_own_identity_or_torchs_when_asked(tmp_path):
    exact, onnx8, torch8 = _scorer(tmp_path), _scorer(tmp_path, int8=True), _scorer(tmp_path, int8=True,
                                                                                      runtime="torch")
    assert len({exact.identity, onnx8.identity, torch8.identity}) == 3
    assert "-t1-q8o-" in onnx8.identity and "-t1-q8-" in torch8.identity
    emb = _embeddings(onnx8)
    assert onnx8.runtime == "onnxruntime" and torch8.runtime == "torch"
    rows = emb[emb.any(axis=1)]
    assert len(rows) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-2)


def test_pool_masks_weights_each_patch_by_the_masks_pixels_in_it():
    from fastsam_backend.core.masks import MaskSet
    from fastsam_backend.models.clip_dense import pool_masks

    grid, patch = 4, 8  # a 32² input; scale 0.5: the image is 64², its patches 16 px
    tokens = np.eye(grid * grid, 16, dtype=np.float32) * 3  # token k: axis k, length 3
    one = np.zeros((64, 64), bool)
    one[2:10, 18:30] = True  # inside patch (0, 1)
    two = np.zeros((64, 64), bool)
    two[16:32, 0:16] = True  # all of patch (1, 0): 256 px
    two[16:32, 16:20] = True  # 64 px of patch (1, 1)
    pooled = pool_masks(tokens, MaskSet.from_dense(np.stack([one, two]), np.ones(2)), scale=0.5, patch=patch)
    assert np.allclose(pooled[0], np.eye(16)[1])
    expected = np.eye(16)[4] * 256 + np.eye(16)[5] * 64
    assert np.allclose(pooled[1], expected / np.linalg.norm(expected), atol=1e-6)


def test_dense_embeddings_have_their_own_identity_and_leave_small_masks_zero(tmp_path):
    crops, dense = _scorer(tmp_path), _scorer(tmp_path, dense_size=96)
    assert "-t1-d96-" in dense.identity and dense.identity != crops.identity
    emb = _embeddings(dense)
    scene = generate_scene(TEST_SEED0 + 2)
    masks = GroundTruthSegmenter([scene]).segment(scene.image)
    big = masks.areas > dense.config.min_mask_area
    assert emb.shape == (len(masks), 64) and big.any()
    assert np.allclose(np.linalg.norm(emb[big], axis=1), 1, atol=1e-2) and not emb[~big].any()
    with pytest.raises(ModelUnavailable, match="CLIP_DENSE_SIZE=100 is not a multiple"):
        _scorer(tmp_path, dense_size=100).load()


def test_text_features_without_the_padding_are_the_full_contexts():
    """A phrase's tokens end long before CLIP's context does; with a causal mask the padding never
    reaches the end-of-text token, so the text tower reads only the used positions."""
    import torch

    from fastsam_backend.models.clip_runtime import text_tower, trim_padding, truncates

    scorer = _scorer(Path("unused"), runtime="torch")
    scorer.load()
    model = scorer._model
    tokens = scorer._tokenizer(["red circle", "a photo of a big blue ring with a hole.", "x"])
    trimmed = trim_padding(tokens)
    assert truncates(model) and trimmed.shape[1] < tokens.shape[1] and (tokens[:, trimmed.shape[1]:] == 0).all()
    with torch.inference_mode():
        full, ours = model.encode_text(tokens), text_tower(model)(trimmed)
    assert torch.allclose(full, ours, atol=1e-5)


def test_quality_clip_scores_text_and_labels_and_compares_each_variant_with_the_reference(tmp_path):
    """``quality-clip``: the fixture CLIP names its objects on ground-truth masks; the exact torch
    tower agrees with the ONNX reference, a lower input side visibly does not."""
    from fastsam_backend.cli.quality_clip import variants
    from fastsam_backend.quality.clip_eval import evaluate_clip, markdown
    from fastsam_backend.quality.evaluation import held_out_seeds

    reference = _scorer(tmp_path)
    configs = dict(variants(reference.config, *reference.input_grid()))
    assert configs["as configured"] is reference.config and len(configs) == 7
    seeds = held_out_seeds(4)
    base = evaluate_clip(reference, seeds)
    rows = [base.summary(base)]
    for setting in ("CLIP_RUNTIME=torch", next(k for k in configs if k.startswith("CLIP_IMAGE_SIZE="))):
        rows.append(evaluate_clip(ClipScorer(configs[setting]), seeds).summary(base))
    assert rows[0]["text_top1"] >= 0.8 and rows[0]["text_n"] >= 8 and "cosine_min" not in rows[0]
    assert rows[1]["runtime"] == "torch" and rows[1]["cosine_min"] >= 0.999 and rows[1]["label_agreement"] == 1.0
    assert rows[1]["text_top1"] == rows[0]["text_top1"] and rows[1]["zero_shot_n"] == rows[0]["zero_shot_n"]
    assert rows[2]["cosine_min"] < 0.99 and rows[2]["clip"] != rows[0]["clip"]
    assert markdown(rows).count("\n") == 4
