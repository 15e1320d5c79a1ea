import numpy as np
import pytest

from fastsam_backend.core.masks import MaskSet


def dense(*rects, size=(8, 10)):
    out = np.zeros((len(rects), *size), dtype=bool)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        out[i, y0:y1, x0:x1] = True
    return out


def test_from_dense_round_trip_and_tight_boxes():
    masks = dense((1, 2, 4, 5), (0, 0, 10, 8), (6, 6, 7, 7))
    masks[1, 3, 3] = False
    ms = MaskSet.from_dense(masks, np.array([0.9, 0.5, 0.7]))
    assert len(ms) == 3
    assert ms.boxes.tolist() == [[1, 2, 4, 5], [0, 0, 10, 8], [6, 6, 7, 7]]
    assert ms.areas.tolist() == [9, 79, 1]
    np.testing.assert_array_equal(ms.dense(), masks)
    np.testing.assert_array_equal(ms.union(), masks.any(axis=0))


def test_empty_masks_are_dropped_with_their_scores():
    masks = dense((1, 1, 3, 3), (0, 0, 0, 0), (4, 4, 6, 6))
    ms = MaskSet.from_dense(masks, np.array([0.1, 0.2, 0.3]))
    assert len(ms) == 2
    assert ms.scores.tolist() == pytest.approx([0.1, 0.3])


def test_indexing_returns_a_maskset():
    ms = MaskSet.from_dense(dense((0, 0, 2, 2), (2, 2, 5, 5), (5, 5, 9, 7)), np.array([0.9, 0.2, 0.8]))
    high = ms[ms.scores > 0.5]
    assert isinstance(high, MaskSet)
    assert high.boxes.tolist() == [[0, 0, 2, 2], [5, 5, 9, 7]]
    assert len(ms[[1]]) == 1 and len(ms[1]) == 1 and len(ms[ms.scores > 2]) == 0


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [(0, 0, [True, False]), (3, 3, [False, True]), (1, 1, [True, False]), (9, 7, [False, False])],
)
def test_contains(x, y, expected):
    ms = MaskSet.from_dense(dense((0, 0, 2, 2), (2, 2, 5, 5)), np.ones(2))
    assert ms.contains(x, y).tolist() == expected


def test_box_intersections_match_dense_computation():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 20, 30)) > 0.6
    ms = MaskSet.from_dense(masks, np.ones(6))
    for box in [(0, 0, 30, 20), (5, 3, 17, 11), (29, 19, 30, 20), (10, 10, 11, 11)]:
        x0, y0, x1, y1 = box
        expected = masks[:, y0:y1, x0:x1].sum(axis=(1, 2))
        assert ms.box_intersections(box).tolist() == expected.tolist()
        assert (ms.box_overlaps(box) >= expected).all()  # the bound best_box_match prunes with


def test_pairwise_iou_matches_dense_computation():
    rng = np.random.default_rng(1)
    masks = np.zeros((5, 20, 30), bool)
    boxes = [(0, 0, 30, 20), (5, 3, 17, 11), (10, 8, 25, 19), (26, 0, 30, 4), (5, 3, 17, 11)]
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > 0.3
    ms = MaskSet.from_dense(masks, np.ones(5))
    for i in range(5):
        for j in range(5):
            union = (masks[i] | masks[j]).sum()
            assert ms.iou(i, j) == pytest.approx((masks[i] & masks[j]).sum() / union)
    assert ms.iou(1, 3) == 0.0  # boxes do not overlap


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(boxes=np.zeros((2, 4), np.int32)), "boxes must have shape"),
        (dict(scores=np.zeros(3, np.float32)), "scores must have shape"),
        (dict(boxes=np.array([[0, 0, 11, 2]], np.int32)), "outside"),
        (dict(crops=(np.ones((3, 3), bool),)), "crop 0 must be bool of shape"),
    ],
)
def test_validation_names_the_problem(kwargs, message):
    base = dict(image_size=(8, 10), boxes=np.array([[0, 0, 2, 2]], np.int32),
                scores=np.ones(1, np.float32), crops=(np.ones((2, 2), bool),))
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MaskSet(**base)


def test_empty_maskset():
    ms = MaskSet.empty((4, 5))
    assert len(ms) == 0
    assert ms.dense().shape == (0, 4, 5)
    assert not ms.union().any()
    assert ms.contains(1, 1).shape == (0,)
