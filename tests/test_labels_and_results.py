"""Label config parsing, zero-shot label assignment, text selection and region serialisation."""

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle as sdk_decode_rle

from fastsam_backend.core.selection import names_several, select_by_text
from fastsam_backend.errors import BadRequest
from fastsam_backend.labels.zero_shot import LabelPhrases, label_named_in, zero_shot
from fastsam_backend.ls.labelconfig import parse_label_config
from fastsam_backend.ls.regions import brush_region, mask_polygons, regions_for
from tests.helpers import LABEL_CONFIG, iou

FULL_CONFIG = """<View>
  <Image name="img" value="$photo"/>
  <BrushLabels name="brush" toName="img">
    <Label value="Cat" predicted_values="kitten,kitty"/><Label value="Dog"/></BrushLabels>
  <PolygonLabels name="poly" toName="img"><Label value="Cat"/></PolygonLabels>
  <RectangleLabels name="rect" toName="img"><Label value="Dog"/></RectangleLabels>
  <RectangleLabels name="prompt_box" toName="img" smart="true"><Label value="Cat"/></RectangleLabels>
  <BrushLabels name="other" toName="somewhere_else"><Label value="X"/></BrushLabels>
</View>"""


def test_parse_the_captured_config():
    config = parse_label_config(LABEL_CONFIG)
    assert (config.image_name, config.image_key) == ("image", "image")
    assert config.brush.from_name == "tag" and config.brush.labels == ("Banana", "Orange")
    # smart tools are prompts, not pre-annotation targets
    assert [t.from_name for t in config.pre_annotation_targets()] == ["tag"]


def test_parse_full_config():
    config = parse_label_config(FULL_CONFIG)
    assert config.image_key == "photo"
    assert [(t.kind, t.from_name) for t in config.pre_annotation_targets()] == [
        ("brushlabels", "brush"), ("polygonlabels", "poly"), ("rectanglelabels", "rect")]
    assert config.brush.synonyms["Cat"] == ("kitten", "kitty")
    assert config.brush.match_label("cat") == "Cat" and config.brush.match_label("Cow") is None


@pytest.mark.parametrize(("xml", "message"), [
    ("", "label_config is missing"),
    ("<View><Image", "not valid XML"),
    ("<View><BrushLabels name='b' toName='i'/></View>", "no <Image>"),
    ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'/></View>", "no BrushLabels"),
])
def test_bad_configs(xml, message):
    with pytest.raises(BadRequest, match=message):
        parse_label_config(xml)


def test_zero_shot_uses_the_best_phrase_of_each_label():
    tag = parse_label_config(FULL_CONFIG).brush
    phrases = LabelPhrases.of(tag)
    assert phrases.phrases == ("Cat", "kitten", "kitty", "Dog")
    eye = np.eye(4, dtype=np.float32)
    # masks resembling "kitty", "Dog", and neither
    masks = np.stack([eye[2], eye[3], np.zeros(4, np.float32)])
    labels, sims = zero_shot(masks, eye, phrases.owner, 2)
    assert labels[:2].tolist() == [0, 1]
    assert sims.tolist() == pytest.approx([1.0, 1.0, 0.0])


@pytest.mark.parametrize(("text", "labels", "expected"), [
    ("the big banana", ("Banana", "Orange"), "Banana"),
    ("all oranges", ("Banana", "Orange"), "Orange"),
    ("red car", ("Car", "Red car"), "Red car"),
    ("something", ("Banana",), None),
])
def test_label_named_in(text, labels, expected):
    assert label_named_in(text, labels) == expected


def test_select_by_text():
    sims = np.array([0.1, 0.5, 0.49, -np.inf, 0.2])
    assert select_by_text(sims) == [1]
    assert select_by_text(sims, several=True, margin=0.02) == [1, 2]
    assert select_by_text(sims, np.array([1, 0, 0, 1, 1], bool)) == [4]
    assert select_by_text(np.array([-np.inf])) == []
    assert names_several("All red circles") and not names_several("a ball")


def blob_mask(h=60, w=80):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - 30) ** 2 / 400 + (xx - 40) ** 2 / 900 < 1) | ((yy - 10) ** 2 + (xx - 70) ** 2 < 25)


def test_brush_region_decodes_through_the_sdk():
    tag = parse_label_config(FULL_CONFIG).brush
    mask = blob_mask()
    region = brush_region(tag, mask, "Cat", 0.87)
    assert region["type"] == "brushlabels" and region["from_name"] == "brush" and region["to_name"] == "img"
    assert (region["original_width"], region["original_height"]) == (80, 60)
    decoded = sdk_decode_rle(region["value"]["rle"]).reshape(60, 80, 4)[:, :, 3] > 0
    np.testing.assert_array_equal(decoded, mask)
    assert region["value"]["brushlabels"] == ["Cat"] and region["score"] == 0.87


def rasterize(regions, h, w):
    import cv2

    out = np.zeros((h, w), np.uint8)
    for r in regions:
        pts = np.array(r["value"]["points"]) * [w / 100, h / 100]
        cv2.fillPoly(out, [np.round(pts - 0.5).astype(np.int32)], 1)
    return out.astype(bool)


def test_polygons_match_the_mask():
    config = parse_label_config(FULL_CONFIG)
    poly_tag = next(t for t in config.outputs if t.kind == "polygonlabels")
    mask = blob_mask()
    regions = regions_for(poly_tag, mask, "Cat", 0.5)
    assert len(regions) == 2  # two separate blobs → two polygons
    assert all(r["value"]["closed"] and r["value"]["polygonlabels"] == ["Cat"] for r in regions)
    assert iou(rasterize(regions, 60, 80), mask) >= 0.9


def test_rectangle_region_is_the_tight_box():
    config = parse_label_config(FULL_CONFIG)
    rect_tag = next(t for t in config.outputs if t.from_name == "rect")
    mask = np.zeros((50, 100), bool)
    mask[10:20, 30:60] = True
    (region,) = regions_for(rect_tag, mask, "Dog", 0.5)
    assert region["value"]["x"] == pytest.approx(30.0) and region["value"]["y"] == pytest.approx(20.0)
    assert region["value"]["width"] == pytest.approx(30.0) and region["value"]["height"] == pytest.approx(20.0)
    assert regions_for(rect_tag, np.zeros((5, 5), bool), "Dog", 0.5) == []


def test_ring_polygon_is_its_outline():
    yy, xx = np.mgrid[:100, :100]
    r2 = (yy - 50) ** 2 + (xx - 50) ** 2
    ring = (r2 < 40**2) & (r2 >= 20**2)
    (poly,) = mask_polygons(ring)
    assert len(poly) >= 8  # simplified, but still round


def test_whitened_square_crop():
    from fastsam_backend.core.masks import MaskSet
    from fastsam_backend.models.clip import whitened_square_crop

    image = np.zeros((20, 30, 3), np.uint8)
    image[:] = (10, 20, 30)
    mask = np.zeros((20, 30), bool)
    mask[5:9, 2:14] = True
    mask[5, 2] = False
    crop = whitened_square_crop(image, MaskSet.from_dense(mask[None], np.ones(1)), 0)
    assert crop.shape == (12, 12, 3)
    assert (crop[4:8][mask[5:9, 2:14]] == (10, 20, 30)).all()  # the object, centred
    assert (crop[:4] == 255).all() and (crop[4, 0] == 255).all()  # padding and the hole are white


def test_whitened_square_crop_is_the_boolean_copy_on_random_masks():
    """The masked copy (OpenCV) writes exactly the pixels ``out[crop] = image[box][crop]`` writes:
    wide and tall boxes, boxes on the image border, one-pixel masks, masks of a sliced MaskSet."""
    from fastsam_backend.core.masks import MaskSet
    from fastsam_backend.models.clip import whitened_square_crop

    rng = np.random.default_rng(7)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        dense = rng.random((3, h, w)) < rng.random()
        dense[:, rng.integers(h), rng.integers(w)] = True  # never empty
        masks = MaskSet.from_dense(dense, np.ones(3))[np.array([2, 0])]
        for i in range(len(masks)):
            x0, y0, x1, y1 = (int(v) for v in masks.boxes[i])
            side = max(y1 - y0, x1 - x0)
            ref = np.full((side, side, 3), 255, np.uint8)
            top, left = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
            ref[top:top + y1 - y0, left:left + x1 - x0][masks.crops[i]] = image[y0:y1, x0:x1][masks.crops[i]]
            assert np.array_equal(whitened_square_crop(image, masks, i), ref)


def test_regions_limited_to_a_box_are_the_same_regions():
    """Selections and pre-annotation pass each mask's box so that encoding, contours and the
    tight box read only it; the regions must not change. Generated objects hit every edge."""
    from fastsam_backend.quality.scenes import generate_scene

    config = parse_label_config(FULL_CONFIG)
    tags = config.pre_annotation_targets()
    checked = 0
    for seed in range(1_000_400, 1_000_406):
        scene = generate_scene(seed)
        h, w = scene.image.shape[:2]
        for obj in scene.objects:
            rows, cols = np.flatnonzero(obj.mask.any(axis=1)), np.flatnonzero(obj.mask.any(axis=0))
            tight = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
            loose = (max(tight[0] - 3, 0), tight[1], w, min(tight[3] + 2, h))  # box to the right edge
            for box in (tight, loose, (0, 0, w, h)):
                for tag in tags:
                    plain = regions_for(tag, obj.mask, "Cat", 0.5)
                    boxed = regions_for(tag, obj.mask, "Cat", 0.5, box)
                    assert [r["value"] for r in boxed] == [r["value"] for r in plain], (seed, tag.kind, box)
                    checked += 1
    assert checked > 100


def test_an_answer_is_each_selections_regions_in_order():
    """``answer_regions`` encodes the selections' crops together; the regions are the ones each
    selection's whole mask gives, selection after selection, each in the tags' order."""
    from fastsam_backend.core.masks import MaskSet
    from fastsam_backend.core.selection import Selection
    from fastsam_backend.ls.answers import answer_regions
    from fastsam_backend.ls.polygons import DEFAULT_STYLE
    from fastsam_backend.ls.regions import brush_regions, polygon_regions
    from fastsam_backend.quality.scenes import generate_scene

    config = parse_label_config(FULL_CONFIG)
    tags = (config.brush, config.polygon)
    scene = generate_scene(1_000_401)
    h, w = scene.image.shape[:2]
    edges = np.zeros((4, h, w), bool)  # pieces touching each border and corner, one of one pixel
    edges[0, :7, :9] = edges[0, 3, 20:25] = True
    edges[1, h - 5:, w - 1:] = True
    edges[2, 10:h - 10, :] = True
    edges[2, 20:30, 5:15] = False
    edges[3, h - 1, 0] = True
    dense = np.concatenate([np.stack([o.mask for o in scene.objects]), edges])
    masks = MaskSet.from_dense(dense, np.linspace(0.9, 0.5, len(dense)))
    selections = [Selection.of_instance(masks, i, 0.1 * i) for i in range(len(masks))]
    selections.append(Selection.of_mask(masks.mask(0) | masks.mask(1), 0.7, (0, 1), masks.union_box([0, 1])))
    got = answer_regions(tags, selections, lambda tag: "Cat", DEFAULT_STYLE)
    expected = []
    for s in selections:
        expected.append(brush_region(tags[0], s.mask, "Cat", s.score))
        expected += polygon_regions(tags[1], s.mask, "Cat", s.score)
    assert [(r["type"], r["value"], r["score"]) for r in got] == [(r["type"], r["value"], r["score"]) for r in expected]
    assert len({r["id"] for r in got}) == len(got)
    assert answer_regions(tags, [], lambda tag: "Cat", DEFAULT_STYLE) == []
    (one,) = brush_regions(tags[0], masks.image_size, [selections[2].box], [selections[2].crop], None, [0.5])
    assert one["value"] == brush_region(tags[0], masks.mask(2), None, 0.5)["value"]


def test_captured_requests_are_found_by_path_and_kind():
    from fastsam_backend.quality.lsrequests import captured

    assert captured("/setup", interactive=False)["project"]  # the kind only sorts /predict bodies
    assert captured("/predict", interactive=True)["params"]["context"]["result"]
    assert captured("/predict", interactive=False)["params"]["context"] is None
