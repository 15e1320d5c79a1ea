"""Selection on hand-made masks: a scene of background ⊃ table ⊃ cup, plus a separate ball."""

import numpy as np
import pytest

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.core.morphology import smooth_mask
from fastsam_backend.core.selection import Selection, box_ious, select_by_box, select_by_points
from fastsam_backend.settings import PointRule

H, W = 40, 60


def rect(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


BACKGROUND = np.ones((H, W), bool)
TABLE = rect(5, 5, 35, 35)
CUP = rect(10, 10, 20, 20)
BALL = rect(40, 10, 50, 20)
SCENE = MaskSet.from_dense(np.stack([BACKGROUND, TABLE, CUP, BALL]), np.array([0.5, 0.8, 0.9, 0.7]))


def points(*xy):
    return np.array(xy, dtype=np.int64).reshape(-1, 2)


@pytest.mark.parametrize(
    ("rule", "pts", "pos", "expected"),
    [
        # the default rule: each click takes the smallest mask under it
        (PointRule.SMALLEST, [(15, 15)], [True], CUP),
        (PointRule.SMALLEST, [(25, 25)], [True], TABLE),
        (PointRule.SMALLEST, [(15, 15), (45, 15)], [True, True], CUP | BALL),
        # a negative click on the cup removes it from the table
        (PointRule.SMALLEST, [(25, 25), (15, 15)], [True, False], TABLE & ~CUP),
        # the paper: every mask containing the click, merged — the known failure
        (PointRule.PAPER, [(15, 15)], [True], BACKGROUND),
        (PointRule.PAPER, [(15, 15), (2, 2)], [True, False], TABLE),
        # CASIA: area-ordered painting, the smallest mask under a click wins its pixels
        (PointRule.CASIA, [(15, 15)], [True], BACKGROUND),
        (PointRule.CASIA, [(15, 15), (2, 2)], [True, False], TABLE),
    ],
)
def test_point_rules(rule, pts, pos, expected):
    sel = select_by_points(SCENE, points(*pts), np.array(pos), rule=rule, morphology=False)
    assert sel is not None
    np.testing.assert_array_equal(sel.mask, expected)


def test_smallest_rule_adds_a_second_detection_of_the_same_object_but_not_its_surroundings():
    cup_left, cup_right = rect(10, 10, 17, 20), rect(12, 10, 20, 20)  # two overlapping halves, IoU 0.5
    masks = MaskSet.from_dense(np.stack([BACKGROUND, TABLE, cup_left, cup_right]), np.array([0.5, 0.8, 0.9, 0.9]))
    sel = select_by_points(masks, points((14, 15)), np.array([True]), morphology=False)
    np.testing.assert_array_equal(sel.mask, cup_left | cup_right)
    assert sorted(sel.indices) == [2, 3]
    # a duplicate that holds the background click is not added
    sel = select_by_points(masks, points((14, 15), (18, 15)), np.array([True, False]), morphology=False)
    np.testing.assert_array_equal(sel.mask, cup_left)


def test_casia_negative_inside_a_positive_mask_erases_it():
    # the reference paints the table with 1 then 0 (both clicks lie on it): nothing is left
    sel = select_by_points(SCENE, points((25, 25), (15, 15)), np.array([True, False]), rule=PointRule.CASIA)
    assert sel is None


@pytest.mark.parametrize("rule", list(PointRule))
def test_no_foreground_or_no_mask_gives_none(rule):
    only_negative = select_by_points(SCENE, points((15, 15)), np.array([False]), rule=rule)
    assert only_negative is None
    empty = MaskSet.empty((H, W))
    assert select_by_points(empty, points((15, 15)), np.array([True]), rule=rule) is None


def test_click_on_no_mask_gives_none():
    scene = MaskSet.from_dense(np.stack([CUP]), np.array([0.9]))
    assert select_by_points(scene, points((50, 30)), np.array([True])) is None


def test_points_and_labels_must_agree():
    with pytest.raises(ValueError, match="2 points but 1 labels"):
        select_by_points(SCENE, points((1, 1), (2, 2)), np.array([True]))


def test_box_picks_highest_iou():
    ious = box_ious(SCENE, (10, 10, 20, 20))
    assert ious.argmax() == 2 and ious[2] == pytest.approx(1.0)
    sel = select_by_box(SCENE, (9, 9, 21, 21))
    np.testing.assert_array_equal(sel.mask, CUP)
    np.testing.assert_array_equal(select_by_box(SCENE, (4, 4, 36, 36)).mask, TABLE)


def test_box_iou_formula_against_dense():
    box = (12, 3, 44, 27)
    boxmask = rect(*box)
    dense = SCENE.dense()
    inter = (dense & boxmask).sum(axis=(1, 2))
    union = boxmask.sum() + dense.sum(axis=(1, 2)) - inter
    np.testing.assert_allclose(box_ious(SCENE, box), inter / union)


def test_box_with_nothing_inside_gives_none():
    scene = MaskSet.from_dense(np.stack([CUP]), np.array([0.9]))
    assert select_by_box(scene, (40, 30, 50, 40)) is None


def test_box_with_negative_click_cuts_and_clips():
    sel = select_by_box(SCENE, (5, 5, 35, 35), points((15, 15)), np.array([False]), morphology=False)
    np.testing.assert_array_equal(sel.mask, TABLE & ~CUP)


def test_box_with_positive_click_adds_within_box():
    # box on the cup, positive click on the table part inside the box: the table joins, clipped to the box
    sel = select_by_box(SCENE, (8, 8, 24, 24), points((22, 22)), np.array([True]), morphology=False)
    np.testing.assert_array_equal(sel.mask, (CUP | TABLE) & rect(8, 8, 24, 24))


def test_smoothing_removes_specks_and_fills_small_holes_but_keeps_rings():
    mask = rect(10, 10, 40, 30)
    mask[20, 20] = False  # pinhole
    mask[2, 2] = True  # speck
    ring = rect(5, 5, 25, 25) & ~rect(10, 10, 20, 20)
    out = smooth_mask(mask)
    assert out[20, 20] and not out[2, 2]
    np.testing.assert_array_equal(smooth_mask(ring), ring)


def test_smoothing_keeps_a_clicked_speck():
    mask = rect(10, 10, 40, 30)
    mask[2, 2] = True
    assert smooth_mask(mask, keep_points=points((2, 2)))[2, 2]


def test_smoothing_empty():
    assert not smooth_mask(np.zeros((5, 5), bool)).any()


def test_selection_reports_what_it_used():
    sel = select_by_points(SCENE, points((15, 15), (45, 15)), np.array([True, True]))
    assert set(sel.indices) == {2, 3}
    assert sel.score == pytest.approx((0.9 + 0.7) / 2)


def test_a_selection_holds_its_crop_and_builds_its_mask_on_demand():
    # a box alone selects its instance as it is: the mask set's crop, no image-sized mask yet
    sel = select_by_box(SCENE, (9, 9, 21, 21))
    assert sel.crop is SCENE.crops[2] and sel.box == (10, 10, 20, 20) and sel.image_size == (H, W)
    assert "mask" not in sel.__dict__
    np.testing.assert_array_equal(sel.mask, CUP)
    assert sel.mask is sel.mask  # built once
    one = Selection.of_instance(SCENE, 3, 0.25)
    assert (one.indices, one.score, one.box) == ((3,), 0.25, (40, 10, 50, 20))
    np.testing.assert_array_equal(one.mask, BALL)
    # a dense mask is kept as it is, its crop a view of it
    merged = select_by_points(SCENE, points((15, 15), (45, 15)), np.array([True, True]), morphology=False)
    assert merged.mask.shape == (H, W) and np.shares_memory(merged.crop, merged.mask)
    x0, y0, x1, y1 = merged.box
    np.testing.assert_array_equal(merged.crop, (CUP | BALL)[y0:y1, x0:x1])
    assert not merged.mask.any() or merged.mask.sum() == merged.crop.sum()  # nothing outside the box


def test_best_box_match_is_the_argmax_of_all_ious():
    from fastsam_backend.core.selection import best_box_match

    rng = np.random.default_rng(3)
    for _ in range(50):
        dense = np.zeros((12, H, W), bool)
        for m in dense:
            x0, y0 = rng.integers(0, W - 5), rng.integers(0, H - 5)
            x1, y1 = rng.integers(x0 + 1, W + 1), rng.integers(y0 + 1, H + 1)
            m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > 0.2
        ms = MaskSet.from_dense(dense, np.ones(12))
        x0, y0 = rng.integers(0, W - 2), rng.integers(0, H - 2)
        box = (int(x0), int(y0), int(rng.integers(x0 + 1, W + 1)), int(rng.integers(y0 + 1, H + 1)))
        ious = box_ious(ms, box)
        best, value = best_box_match(ms, box)
        assert value == pytest.approx(ious.max())
        if value > 0:
            assert best == int(np.argmax(ious))


def _smooth_reference(mask, keep_points=None):
    """The smoothing rule written plainly over the whole image (OpenCV's component stats)."""
    import cv2

    area = int(mask.sum())
    if area == 0:
        return mask
    speck, hole = max(16, int(0.01 * area)), max(16, int(0.01 * area))
    padded = np.pad(mask, 1)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(padded.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= speck
    keep[0] = False
    if len(keep) > 1:
        keep[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))] = True  # the largest piece is never a speck
    for x, y in keep_points if keep_points is not None else []:
        if labels[y + 1, x + 1]:
            keep[labels[y + 1, x + 1]] = True
    cleaned = keep[labels]
    _, blabels, bstats, _ = cv2.connectedComponentsWithStats((~cleaned).astype(np.uint8), connectivity=4)
    fill = bstats[:, cv2.CC_STAT_AREA] < hole
    fill[0] = False
    fill[blabels[0, 0]] = False  # the padding ring: everything outside the mask
    return (cleaned | fill[blabels])[1:-1, 1:-1]


@pytest.mark.parametrize("seed", range(40))
def test_smoothing_matches_the_plain_rule(seed):
    import cv2

    rng = np.random.default_rng(seed)
    mask = np.zeros((H, W), np.uint8)
    for _ in range(rng.integers(1, 4)):  # a few blobs, at the image edge too
        cv2.circle(mask, (int(rng.integers(-5, W + 5)), int(rng.integers(-5, H + 5))), int(rng.integers(3, 25)), 1, -1)
    mask = mask.astype(bool)
    mask ^= rng.random((H, W)) < 0.03  # specks and pinholes
    if seed % 5 == 0:
        mask[:] = True
        mask[rng.integers(1, H - 1), rng.integers(1, W - 1)] = False  # one hole in a mask filling the image
    pts = np.argwhere(mask)[:2][:, ::-1] if mask.any() else None
    np.testing.assert_array_equal(smooth_mask(mask, keep_points=pts), _smooth_reference(mask, pts))
    np.testing.assert_array_equal(smooth_mask(mask), _smooth_reference(mask))


def _outer_with_inner(inner_side: int = 6) -> MaskSet:
    """A 60x60 square with a small square object inside it (a hole in the outer mask, under 1 % of
    its area, so small-hole filling would take it), and the inner object itself."""
    outer = np.zeros((80, 80), bool)
    outer[10:70, 10:70] = True
    inner = np.zeros_like(outer)
    inner[30:30 + inner_side, 30:30 + inner_side] = True
    outer &= ~inner
    return MaskSet.from_dense(np.stack([outer, inner]), np.array([0.9, 0.8]))


@pytest.mark.parametrize("rule", list(PointRule))
def test_an_object_inside_the_selection_is_not_filled_in(rule):
    """Seen in the real UI: hole filling put an enclosed object back into the outer object's mask,
    and an Alt-click on it could not take it out."""
    masks = _outer_with_inner()
    inner = masks.mask(1)
    plain = select_by_points(masks, np.array([[15, 15]]), np.array([True]), rule=rule)
    assert plain is not None and not (plain.mask & inner).any()
    cut = select_by_points(masks, np.array([[15, 15], [32, 32]]), np.array([True, False]), rule=rule)
    assert cut is not None and not (cut.mask & inner).any() and cut.mask[15, 15]


def test_a_hole_under_a_background_click_stays_open_and_noise_holes_still_fill():
    mask = np.zeros((80, 80), bool)
    mask[10:70, 10:70] = True
    mask[30:35, 30:35] = False  # a small hole that is no object
    assert smooth_mask(mask)[32, 32]  # filled, as before
    assert not smooth_mask(mask, open_points=np.array([[32, 32]]))[32, 32]


def test_smoothing_never_removes_the_whole_selection():
    """Every piece smaller than a speck (a tiny selection cut by a background click): the largest
    stays, so a click that picked something never answers an empty region (found by hypothesis)."""
    mask = np.zeros((40, 40), bool)
    mask[2:5, 2:5] = True  # 9 px
    mask[20:22, 30:32] = True  # 4 px
    out = smooth_mask(mask)
    assert out[2:5, 2:5].all() and not out[20:22, 30:32].any()
    crops = (np.array([[1], [0], [0], [0], [1]], bool), np.array([[1, 1], [0, 0], [0, 0], [0, 1]], bool))
    masks = MaskSet((5, 2), np.array([[0, 0, 1, 5], [0, 0, 2, 4]], np.int32), np.zeros(2, np.float32), crops)
    picked = select_by_points(masks, np.array([[0, 0], [0, 4]]), np.array([True, False]), rule=PointRule.CASIA,
                              morphology=True)
    assert picked is not None and picked.mask.any()
