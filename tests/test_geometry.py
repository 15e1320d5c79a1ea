"""Mask-geometry descriptors and the geometry half of the learned label model (pure numpy)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fastsam_backend.core.geometry import FEATURES, N_FEATURES, mask_geometry
from fastsam_backend.core.masks import MaskSet
from fastsam_backend.labels.label_model import Example, LabelModel, learned_label

SIZE = (96, 96)


def disc(r: int = 30, hole: int = 0) -> np.ndarray:
    m = np.zeros(SIZE, np.uint8)
    cv2.circle(m, (48, 48), r, 1, -1)
    if hole:
        cv2.circle(m, (48, 48), hole, 0, -1)
    return m.astype(bool)


def box(w: int, h: int) -> np.ndarray:
    m = np.zeros(SIZE, bool)
    m[48 - h // 2:48 + h // 2, 48 - w // 2:48 + w // 2] = True
    return m


def feats(*masks: np.ndarray) -> np.ndarray:
    return mask_geometry(MaskSet.from_dense(np.stack(masks), np.ones(len(masks), np.float32)))


def col(name: str) -> int:
    return FEATURES.index(name)


@pytest.mark.parametrize("feature,higher,lower", [
    ("circle_fill", disc(), box(50, 50)),  # a disc fills its enclosing circle, a square does not
    ("rectangularity", box(60, 30), disc()),  # a box fills its rotated rectangle, a disc pi/4 of it
    ("log_elongation", box(80, 20), box(40, 40)),
    ("hole_fraction", disc(30, 15), disc(30)),
    ("log1p_holes", disc(30, 15), disc(30)),
    ("log_area_fraction", disc(40), disc(10)),
    ("circularity", disc(), box(80, 10)),
])
def test_each_descriptor_tells_shapes_apart(feature, higher, lower):
    f = feats(higher, lower)
    assert f[0, col(feature)] > f[1, col(feature)] + 0.05


def test_descriptors_are_rotation_and_scale_invariant_where_they_say_so():
    bar = box(70, 20)
    f = feats(bar, np.rot90(bar).copy(), box(35, 10))
    invariant = [col(n) for n in ("log_elongation", "solidity", "rectangularity", "circle_fill", "hu1")]
    assert np.allclose(f[0, invariant], f[1, invariant], atol=0.05)
    assert np.allclose(f[0, invariant], f[2, invariant], atol=0.15)  # half the size: pixel effects only


def test_only_the_asked_instances_are_described_and_empty_is_empty():
    masks = MaskSet.from_dense(np.stack([disc(), box(40, 20), disc(10)]), np.ones(3, np.float32))
    part = mask_geometry(masks, [2, 0])
    assert part.shape == (2, N_FEATURES) and part.dtype == np.float32
    assert np.allclose(part, mask_geometry(masks)[[2, 0]])
    assert mask_geometry(MaskSet.empty(SIZE)).shape == (0, N_FEATURES)
    assert np.isfinite(feats(box(2, 2))).all()  # a tiny mask still gives finite numbers


# ------------------------------------------------------------------ geometry in the label model
def _examples(n: int, with_geometry: bool = True) -> list[Example]:
    """Labels CLIP cannot tell apart (one embedding, random colour-like noise) but shape can."""
    rng = np.random.default_rng(0)
    out = []
    for label, make in (("round", lambda: disc(int(rng.integers(20, 40)))),
                        ("bar", lambda: box(int(rng.integers(60, 90)), int(rng.integers(10, 20))))):
        for _ in range(n):
            emb = np.array([1.0, rng.normal(0, 0.05), rng.normal(0, 0.05)], np.float32)
            out.append(Example(label, emb / np.linalg.norm(emb), feats(make())[0] if with_geometry else None))
    return out


def test_geometry_decides_where_clip_cannot_and_is_weighted_by_leave_one_out():
    model = LabelModel.fit(_examples(4), min_examples=2)
    assert model.geometry is not None and model.geometry.weight > 0
    emb = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (2, 1))
    geo = feats(disc(25), box(70, 14))
    assert learned_label(model, emb, ("bar", "round"), min_similarity=0.0, geometry=geo) == ("round", "bar")
    clip_only = LabelModel.fit(_examples(4, with_geometry=False), min_examples=2)
    assert clip_only.geometry is None  # examples stored before geometry existed: CLIP alone
    assert clip_only.version_tag != model.version_tag  # the geometry model shows in model_version


@pytest.mark.parametrize("n,min_examples", [(1, 1), (4, 5)])
def test_no_geometry_without_two_examples_of_every_learned_label(n, min_examples):
    assert LabelModel.fit(_examples(n), min_examples=min_examples).geometry is None
