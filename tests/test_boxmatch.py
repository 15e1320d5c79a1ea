"""Box rules on hand-made masks: where the paper's pixel IoU picks the wrong object and the box
rules do not, and where all agree (issue #15)."""

from __future__ import annotations

import numpy as np
import pytest

from fastsam_backend.core.boxmatch import box_box_ious, box_ious, match_box
from fastsam_backend.core.masks import MaskSet
from fastsam_backend.core.selection import select_by_box
from fastsam_backend.settings import BoxRule

H, W = 60, 60


def rect(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


FRAME = rect(5, 5, 45, 45) & ~rect(9, 9, 41, 41)  # a hollow square: 13 % of its box
INSIDE = rect(12, 12, 38, 38)  # a filled square in its hole
BAR = np.eye(H, W, dtype=bool) | np.eye(H, W, 1, dtype=bool) | np.eye(H, W, -1, dtype=bool)  # a diagonal bar
OCCLUDER = rect(13, 13, 45, 37)
VISIBLE = rect(10, 10, 40, 40) & ~OCCLUDER  # the visible rest (28 %) of a square OCCLUDER hides


def masks(*ms):
    return MaskSet.from_dense(np.stack(ms), np.full(len(ms), 0.9))


def box_of(m):
    ys, xs = np.nonzero(m)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("case, target, others", [
    ("hollow", FRAME, [INSIDE]),
    ("thin", BAR, [rect(20, 20, 40, 40)]),
    ("occluded", VISIBLE, [OCCLUDER]),
])
def test_box_rules_pick_the_object_that_fits_the_box(case, target, others):
    ms = masks(*others, target)
    box, want = box_of(target), len(others)
    assert match_box(ms, box, BoxRule.PAPER)[0] != want  # the failure the issue describes
    assert match_box(ms, box, BoxRule.FIT)[0] == want
    assert match_box(ms, box, BoxRule.BOX)[0] == want


def test_fit_also_sees_a_mask_spill_out_of_the_box():
    """The mask spilling out of the box has the closer box (0.909 against 0.9); ``fit`` weighs
    the spill (0.909 x 0.909) and takes the one inside."""
    inside, spilling = rect(11, 11, 31, 29), rect(11, 11, 31, 33)
    box = (11, 11, 31, 31)
    ms = masks(spilling, inside)
    assert match_box(ms, box, BoxRule.BOX)[0] == 0
    assert match_box(ms, box, BoxRule.FIT)[0] == 1


def test_all_rules_agree_on_plain_separate_objects():
    a, b = rect(5, 5, 25, 25), rect(30, 30, 55, 50)
    ms = masks(a, b)
    for rule in BoxRule:
        assert match_box(ms, box_of(a), rule)[0] == 0 and match_box(ms, box_of(b), rule)[0] == 1


def test_same_box_ties_go_to_the_higher_pixel_iou():
    ms = masks(FRAME, rect(5, 5, 45, 45))  # the frame found twice, with and without its hole
    assert match_box(ms, box_of(FRAME), BoxRule.BOX)[0] == 1
    assert match_box(ms, box_of(FRAME), BoxRule.FIT)[0] == 1


def test_no_mask_in_the_box_is_no_answer():
    ms = masks(rect(0, 0, 10, 10))
    for rule in BoxRule:
        assert match_box(ms, (40, 40, 50, 50), rule)[1] == 0
        assert select_by_box(ms, (40, 40, 50, 50), box_rule=rule) is None
    assert match_box(MaskSet.empty((H, W)), (0, 0, 5, 5), BoxRule.FIT) == (0, 0.0)
    # a mask whose box overlaps the prompt box but has no pixel in it is never picked
    corner = rect(0, 0, 20, 20) & ~rect(10, 10, 20, 20)
    assert box_box_ious(masks(corner), (10, 10, 20, 20))[0] > 0
    assert match_box(masks(corner), (10, 10, 20, 20), BoxRule.BOX)[1] == 0


def test_scores_are_the_documented_ious():
    ms = masks(rect(10, 10, 30, 20), rect(8, 18, 58, 58))
    box = (10, 10, 30, 25)
    np.testing.assert_allclose(box_box_ious(ms, box), [200 / 300, (20 * 7) / (300 + 2000 - 140)])
    assert match_box(ms, box, BoxRule.PAPER) == (0, pytest.approx(box_ious(ms, box).max()))
