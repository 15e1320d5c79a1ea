"""Property tests (hypothesis): the context parser, the selectors and the RLE encoder.

Kept fast: modest ``max_examples``, small masks, no deadline (CI machines are shared).
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter import brush

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.core.selection import select_by_box, select_by_points
from fastsam_backend.errors import BadRequest
from fastsam_backend.ls.prompts import Prompts, parse_context
from fastsam_backend.ls.protocol import context_from
from fastsam_backend.ls.rle import decode_rle, encode_rle, encode_rle_crops
from fastsam_backend.settings import PointRule

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the context parser ------------------------------------------------------------------------------
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 5e-324, -0.0]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=4), max_leaves=12)
KEYS = st.sampled_from(["x", "y", "width", "height", "rotation", "text", "keypointlabels", "rectanglelabels",
                        "positive"])
VALUE = st.dictionaries(KEYS, JSON | st.floats(-200, 200), max_size=8) | JSON
REGION = st.fixed_dictionaries(
    {"type": st.sampled_from(["keypointlabels", "KeyPointLabels", "keypoint", "rectanglelabels", "rectangle",
                              "textarea", "brushlabels", "choices"]) | JSON,
     "value": VALUE},
    optional={"is_positive": st.booleans() | JSON, "original_width": st.integers(-5, 5000) | JSON,
              "original_height": st.integers(-5, 5000) | JSON},
)
CONTEXT = JSON | st.fixed_dictionaries({}, optional={"result": st.lists(REGION | JSON, max_size=5) | JSON})


@FAST
@given(CONTEXT, st.integers(1, 4000), st.integers(1, 4000))
def test_parse_context_raises_only_bad_request(context, width, height):
    try:
        prompts = parse_context(context_from(context))
    except BadRequest as exc:
        assert exc.status == 400 and exc.message
        return
    assert isinstance(prompts, Prompts)
    for point in prompts.points:  # whatever was accepted lands inside the image
        x, y = point.in_pixels(width, height)
        assert 0 <= x < width and 0 <= y < height
    for box in prompts.boxes:
        x0, y0, x1, y1 = box.in_pixels(width, height)
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


# --- the selectors ----------------------------------------------------------------------------------------
@st.composite
def mask_sets(draw) -> MaskSet:
    """0-5 instances on an image of at most 12 x 12: rectangles, blobs and noise."""
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    n = draw(st.integers(0, 5))
    dense = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if draw(st.booleans()):
            y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
            dense[i, y0:draw(st.integers(y0 + 1, h)), x0:draw(st.integers(x0 + 1, w))] = True
        else:
            bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
            dense[i] = np.array(bits, dtype=bool).reshape(h, w)
    scores = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    return MaskSet.from_dense(dense, np.array(scores, dtype=np.float32))


@st.composite
def clicks(draw, masks: MaskSet) -> tuple[np.ndarray, np.ndarray]:
    h, w = masks.image_size
    k = draw(st.integers(0, 4))
    points = [(draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))) for _ in range(k)]
    positive = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    return np.array(points, dtype=np.int64).reshape(-1, 2), np.array(positive, dtype=bool)


def assert_inside_picked_boxes(masks: MaskSet, selection) -> None:
    """The result lies within the union of the picked masks' boxes, which is its ``box``."""
    if selection is None:
        return
    assert selection.mask.shape == masks.image_size and selection.mask.dtype == np.bool_
    assert selection.indices and all(0 <= i < len(masks) for i in selection.indices)
    assert selection.box == masks.union_box(list(selection.indices))
    allowed = np.zeros(masks.image_size, dtype=bool)
    for i in selection.indices:
        x0, y0, x1, y1 = masks.boxes[i]
        allowed[y0:y1, x0:x1] = True
    assert not (selection.mask & ~allowed).any()
    assert selection.mask.any() and 0.0 <= selection.score <= 1.0


@FAST
@given(st.data(), st.sampled_from(list(PointRule)), st.booleans())
def test_select_by_points_stays_in_the_picked_boxes(data, rule, morphology):
    masks = data.draw(mask_sets())
    points, positive = data.draw(clicks(masks))
    selection = select_by_points(masks, points, positive, rule=rule, morphology=morphology)
    assert_inside_picked_boxes(masks, selection)
    if selection is not None:
        assert positive.any()  # no foreground click, no selection


@FAST
@given(st.data(), st.sampled_from(list(PointRule)), st.booleans())
def test_select_by_box_stays_in_the_picked_boxes(data, rule, morphology):
    masks = data.draw(mask_sets())
    h, w = masks.image_size
    x0, y0 = data.draw(st.integers(0, w - 1)), data.draw(st.integers(0, h - 1))
    box = (x0, y0, data.draw(st.integers(x0 + 1, w)), data.draw(st.integers(y0 + 1, h)))
    points, positive = data.draw(clicks(masks)) if data.draw(st.booleans()) else (None, None)
    selection = select_by_box(masks, box, points, positive, rule=rule, morphology=morphology)
    assert_inside_picked_boxes(masks, selection)
    x0, y0, x1, y1 = box
    in_box = points is not None and any(x0 <= x < x1 and y0 <= y < y1 for x, y in points)
    if selection is not None and in_box:
        # clicks inside the box refine the result, which is then clipped to the box
        assert not selection.mask[:y0].any() and not selection.mask[y1:].any()
        assert not selection.mask[:, :x0].any() and not selection.mask[:, x1:].any()


# --- the RLE encoder ----------------------------------------------------------------------------------------
@st.composite
def masks_2d(draw) -> np.ndarray:
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["noise", "rect", "empty", "full", "rows"]))
    if kind == "noise":
        density = draw(st.floats(0, 1))
        return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random((h, w)) < density
    mask = np.zeros((h, w), dtype=bool)
    if kind == "rect":
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        mask[y0:draw(st.integers(y0 + 1, h)), x0:draw(st.integers(x0 + 1, w))] = True
    elif kind == "full":
        mask[:] = True
    elif kind == "rows":
        mask[draw(st.lists(st.integers(0, h - 1), max_size=h))] = True
    return mask


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@settings(max_examples=100, deadline=None)
@given(masks_2d(), st.data())
def test_rle_round_trips_and_matches_the_sdk(mask, data):
    h, w = mask.shape
    rle = encode_rle(mask)
    assert np.array_equal(decode_rle(rle, h, w), mask)
    assert rle == brush.mask2rle(mask.astype(np.uint8) * 255)
    box = tight_box(mask)
    if box is not None:  # any box holding the mask gives the same bytes
        x0, y0, x1, y1 = box
        grown = (data.draw(st.integers(0, x0)), data.draw(st.integers(0, y0)),
                 data.draw(st.integers(x1, w)), data.draw(st.integers(y1, h)))
        assert encode_rle(mask, box) == rle == encode_rle(mask, grown)


@settings(max_examples=60, deadline=None)
@given(st.lists(masks_2d(), min_size=1, max_size=4), st.data())
def test_rle_of_crops_is_the_rle_of_their_masks(masks, data):
    """Several masks of one image encoded together from their crops and (grown) tight boxes."""
    h, w = masks[0].shape
    masks = [np.pad(m[:h, :w], ((0, h - min(h, m.shape[0])), (0, w - min(w, m.shape[1])))) for m in masks]
    boxes = []
    for mask in masks:
        x0, y0, x1, y1 = tight_box(mask) or (0, 0, 0, 0)
        boxes.append((data.draw(st.integers(0, x0)), data.draw(st.integers(0, y0)),
                      data.draw(st.integers(x1, w)), data.draw(st.integers(y1, h))))
    crops = [m[y0:y1, x0:x1] for m, (x0, y0, x1, y1) in zip(masks, boxes)]
    assert [list(r) for r in encode_rle_crops((h, w), boxes, crops)] == [encode_rle(m) for m in masks]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 40_000), min_size=1, max_size=4), st.booleans())
def test_rle_long_runs_split_like_the_sdk(runs, first):
    """Runs over 16,384 pixels (65,536 RGBA values) are split into chunks, as the SDK does."""
    mask = (np.repeat(np.arange(len(runs)) % 2 == (0 if first else 1), runs))[None, :]
    rle = encode_rle(mask)
    assert rle == brush.mask2rle(mask.astype(np.uint8) * 255)
    assert np.array_equal(decode_rle(rle, 1, mask.shape[1]), mask)
