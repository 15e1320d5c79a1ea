import pytest

from fastsam_backend.errors import BadRequest
from fastsam_backend.ls.prompts import BoxPrompt, PointPrompt, TextPrompt, parse_context
from fastsam_backend.ls.protocol import context_from
from tests.helpers import captured_requests


def parse(context):
    """As the server does it: types checked where the body is decoded, then the prompts."""
    return parse_context(context_from(context))


def keypoint(x, y, **extra):
    region = {"type": "keypointlabels", "from_name": "tag2", "to_name": "image", "original_width": 320,
              "original_height": 240, "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Banana"]}}
    region.update(extra)
    return region


def rect(x, y, w, h, **value):
    return {"type": "rectanglelabels", "value": {"x": x, "y": y, "width": w, "height": h,
                                                  "rectanglelabels": ["Orange"], **value},
            "original_width": 200, "original_height": 100}


def test_captured_interactive_request_parses():
    captured = {"requests": captured_requests()}
    body = next(r["body"] for r in captured["requests"] if r["path"] == "/predict" and r["body"]["params"]["context"])
    prompts = parse(body["params"]["context"])
    assert prompts.points == (PointPrompt(50.0, 50.0, True, "Banana", tool="tag2"),)
    assert prompts.points[0].in_pixels(320, 240) == (160, 120)
    assert prompts.label == "Banana"


@pytest.mark.parametrize(
    ("extra", "positive"),
    [({"is_positive": True}, True), ({"is_positive": False}, False), ({}, True)],
)
def test_keypoint_polarity(extra, positive):
    assert parse({"result": [keypoint(10, 20, **extra)]}).points[0].positive is positive


def test_value_positive_is_accepted():
    region = keypoint(10, 20)
    region["value"]["positive"] = False
    assert parse({"result": [region]}).points[0].positive is False


def test_points_clamp_into_the_image():
    assert PointPrompt(100.0, 100.0).in_pixels(320, 240) == (319, 239)
    assert PointPrompt(-5.0, 0.0).in_pixels(320, 240) == (0, 0)


def test_box_is_top_left_width_height_and_clamps():
    box = parse({"result": [rect(10, 20, 30, 40)]}).boxes[0]
    assert box == BoxPrompt(10.0, 20.0, 40.0, 60.0, "Orange")
    assert box.in_pixels(200, 100) == (20, 20, 80, 60)
    assert BoxPrompt(-10, -10, 120, 130).in_pixels(200, 100) == (0, 0, 200, 100)
    assert BoxPrompt(50, 50, 50, 50).in_pixels(200, 100) == (100, 50, 101, 51)  # never empty


def test_rotated_box_becomes_its_hull():
    box = parse({"result": [rect(50, 50, 10, 20, rotation=90)]}).boxes[0]
    # 90° about the top-left corner: the box swings to the left of x=50
    assert box.x1 == pytest.approx(50.0) and box.y0 == pytest.approx(50.0)
    assert box.x0 == pytest.approx(50 - 20 * 100 / 200) and box.y1 == pytest.approx(50 + 10 * 200 / 100)


def test_text_and_other_regions():
    prompts = parse({"result": [
        # LS sends every text submitted so far in the TextArea: the second prompt is the one asked now
        {"type": "textarea", "value": {"text": ["a yellow hexagon", " a red circle "]}},
        {"type": "brushlabels", "value": {"rle": [1, 2]}},
        {"type": "choices", "value": {"choices": ["x"]}},
    ]})
    assert prompts.texts == (TextPrompt("a red circle"),) and not prompts.points and not prompts.boxes
    assert parse({"result": [{"type": "textarea", "value": {"text": ["a red circle", "  "]}}]}).texts == (
        TextPrompt("a red circle"),)


@pytest.mark.parametrize("context", [None, {}, {"result": []}])
def test_empty_context(context):
    assert not parse(context)


@pytest.mark.parametrize(
    ("context", "field"),
    [
        ("nope", "context must be an object"),
        ({"result": {"a": 1}}, "Expected `array | null`, got `object` - at `context.result`"),
        ({"result": [3]}, r"Expected `object`, got `int` - at `context.result\[0\]`"),
        ({"result": [{"value": {}}]}, r"missing required field `type` - at `context.result\[0\]`"),
        ({"result": [{"type": "keypointlabels"}]}, r"missing required field `value` - at `context.result\[0\]`"),
        ({"result": [{"type": "keypointlabels", "value": {"x": "1", "y": 2}}]}, r"context.result\[0\].value.x"),
        ({"result": [keypoint(1, float("nan"))]}, r"context.result\[0\].value.y"),
        ({"result": [keypoint(1, 2), keypoint(1, 2, is_positive="yes")]}, r"context.result\[1\].is_positive"),
        ({"result": [rect(1, 2, -3, 4)]}, "must not be negative"),
        ({"result": [{"type": "rectanglelabels", "value": {"x": 1, "y": 2, "width": 3}}]}, "value.height"),
        ({"result": [{"type": "textarea", "value": {"text": 5}}]}, "value.text"),
        ({"result": [{"type": "keypointlabels", "value": {"x": 1, "y": 2, "keypointlabels": "A"}}]},
         "keypointlabels"),
    ],
)
def test_malformed_context_names_the_field(context, field):
    with pytest.raises(BadRequest, match=field):
        parse(context)
