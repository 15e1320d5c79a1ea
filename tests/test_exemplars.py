"""Exemplar prompts (issue #26): parsing which tool a region came from, the similarity's choices on
synthetic cues, and whole answers through ``FastSAMService.predict`` over a repeated-kind scene's
ground-truth masks (no CLIP here: geometry and colour; the fixture models' figures are in
tests/test_exemplars_quality.py and docs/exemplars.md)."""

from __future__ import annotations

import numpy as np
import pytest

from fastsam_backend.core import exemplars as ex
from fastsam_backend.core.masks import MaskSet
from fastsam_backend.ls.labelconfig import parse_label_config
from fastsam_backend.ls.prompts import parse_context
from fastsam_backend.ls.protocol import SetupRequest, context_from, predict_request
from fastsam_backend.ls.rle import decode_rle
from fastsam_backend.quality import lsrequests
from fastsam_backend.quality.evaluation import iou
from fastsam_backend.quality.exemplar_eval import LABEL_CONFIG, PROJECT, score
from fastsam_backend.quality.exemplar_scenes import DISTRACTOR_TYPES, dev_seeds, generate_kind_scene, heldout_seeds
from fastsam_backend.quality.fake import GroundTruthSegmenter
from fastsam_backend.server import create_app
from fastsam_backend.service.orchestrator import build_service

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Cell"/><Label value="Debris"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Cell"/><Label value="Debris"/></PolygonLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Cell"/><Label value="Debris"/></KeyPointLabels>
  <RectangleLabels name="similar" toName="image" smart="true">
    <Label value="Cell"/><Label value="Debris"/></RectangleLabels>
  <KeyPointLabels name="similar_click" toName="image" smart="true"><Label value="Debris"/></KeyPointLabels>
  <KeyPointLabels name="plain" toName="image"><Label value="Cell"/></KeyPointLabels>
</View>"""


# ------------------------------------------------------------------ parsing and config
def test_smart_keypoint_and_rectangle_tags_are_tools_and_only_those_are_exemplar_tools():
    config = parse_label_config(CONFIG)
    assert [t.from_name for t in config.tools] == ["click", "similar", "similar_click"]
    assert "keypointlabels" not in {o.kind for o in config.outputs}  # a keypoint is never where answers go
    assert config.exemplar_tools(("similar", "similar_click", "mask", "plain", "nope")) == {"similar", "similar_click"}
    assert config.exemplar_tools(()) == frozenset()


def test_parse_context_keeps_the_tool_and_sets_exemplar_regions_apart():
    regions = [lsrequests.keypoint(10, 10, 100, 100, from_name="click"),
               lsrequests.rectangle(5, 5, 20, 20, 100, 100, label="Cell", from_name="similar"),
               lsrequests.keypoint(50, 50, 100, 100, positive=False, label="Debris", from_name="similar_click"),
               lsrequests.keypoint(60, 60, 100, 100, label="Debris", from_name="similar_click")]
    prompts = parse_context(context_from({"result": regions}), frozenset({"similar", "similar_click"}))
    assert [p.tool for p in prompts.points] == ["click"] and not prompts.boxes
    assert [b.tool for b in prompts.exemplar_boxes] == ["similar"]
    assert [(p.tool, p.positive) for p in prompts.exemplar_points] == [("similar_click", False),
                                                                       ("similar_click", True)]
    assert prompts.has_exemplars and prompts.exemplar_label == "Cell"
    # without exemplar tools the same regions are ordinary prompts, as before
    plain = parse_context(context_from({"result": regions}))
    assert len(plain.points) == 3 and len(plain.boxes) == 1 and not plain.has_exemplars
    # a negative exemplar click alone marks no kind
    only_negative = parse_context(context_from({"result": regions[2:3]}), frozenset({"similar_click"}))
    assert only_negative and not only_negative.has_exemplars


def test_exemplar_tags_are_a_project_option_outside_model_version(make_settings):
    service = build_service(make_settings(clip_enabled=False), GroundTruthSegmenter())
    base = service.setup(SetupRequest("7.1", extra_params={}))
    tuned = service.setup(SetupRequest("8.1", extra_params={"exemplar_tags": "like_this, similar",
                                                            "exemplar_min_similarity": 0.6}))
    assert base == tuned == service.model_version
    assert service.options_for("8").exemplar_tags == ("like_this", "similar")
    assert service.setup(SetupRequest("9.1", extra_params={"exemplar_tags": ["a"]})) == base
    assert service.options_for("9").exemplar_tags == ("a",)


# ------------------------------------------------------------------ the similarity, on synthetic cues
def _masks(n: int, size: int = 200) -> MaskSet:
    """``n`` separate 10x10 squares on a row."""
    dense = np.zeros((n, size, size), bool)
    for i in range(n):
        dense[i, 10:20, 10 + 15 * i:20 + 15 * i] = True
    return MaskSet.from_dense(dense, np.ones(n))


def _cues(geometry_offsets, colour_offsets) -> ex.InstanceCues:
    """Cues whose features differ from instance 0's by the given multiples of the within-kind spread."""
    spread = np.where(np.isfinite(ex.GEOMETRY_SCALES), ex.GEOMETRY_SCALES, 0) / ex.SPREAD  # unused features: 0
    g = np.outer(geometry_offsets, spread)
    c = np.outer(colour_offsets, ex.COLOUR_SCALES / ex.SPREAD)
    return ex.InstanceCues(g.astype(np.float32), c.astype(np.float32))


def test_twins_are_answered_and_a_look_alike_differing_in_one_cue_is_not():
    # 0 exemplar; 1, 2 twins (within one spread); 3 same shape, other colour; 4 same colour, other shape
    cues = _cues([0, 0.5, -0.6, 0.3, 9.0], [0, -0.4, 0.7, 12.0, 0.2])
    match = ex.match_kind(_masks(5), cues, [0])
    assert match.indices == (0, 1, 2)
    assert match.similarity[0] == 1.0 and match.similarity[3] < 0.3 and match.similarity[4] < 0.3


def _at(distances) -> ex.InstanceCues:
    """Cues whose combined distance to instance 0 is ``distances`` (geometry and colour alike)."""
    used = np.isfinite(ex.GEOMETRY_SCALES).mean()  # the geometry cue's mean runs over unused features too
    offsets = np.asarray(distances) * ex.SPREAD / np.sqrt(2)
    return _cues(offsets / np.sqrt(used), offsets)


def test_the_cut_follows_the_image_not_a_constant():
    # the same twin, at combined distance 1.2 (past D_SURE, within the default cap 1.55), is in on an
    # image whose look-alikes lie far off, and out where look-alikes crowd in behind it (no gap)
    far = ex.match_kind(_masks(4), _at([0, 1.2, 5.0, 6.0]), [0])
    assert np.allclose(ex.combined_distance(_at([0, 1.2]), [0]), [0, 1.2])
    assert far.indices == (0, 1)
    crowded = ex.match_kind(_masks(8), _at([0, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]), [0])
    assert crowded.indices == (0,)
    # a gap below D_SURE is no cut: the sure ones are always in
    assert ex.match_kind(_masks(4), _at([0, 0.2, 0.9, 6.0]), [0]).indices == (0, 1, 2)


def test_min_similarity_caps_the_cut_and_negatives_exclude_their_kind():
    cues = _cues([0, 0.3, 0.4, 3.0, 3.1], [0, 0.3, 0.4, 0.0, 0.0])
    masks = _masks(5)
    assert ex.match_kind(masks, cues, [0], min_similarity=0.0).indices[:3] == (0, 1, 2)
    assert ex.match_kind(masks, cues, [0], min_similarity=0.999).indices == (0,)
    # a negative exemplar next to 2 takes 2 (nearer to it than to the positive) and itself out
    cues = _cues([0, 0.3, 1.9, 2.0, 9.0], [0, 0.3, 1.9, 2.0, 9.0])
    assert ex.match_kind(masks, cues, [0], [3]).indices == (0, 1)
    # two exemplars: each instance is compared with the nearer one
    assert set(ex.match_kind(masks, _cues([0, 0.2, 6.0, 6.1, 12.0], [0] * 5), [0, 2]).indices) == {0, 1, 2, 3}


def test_parts_wholes_and_duplicates_of_answered_instances_are_left_out():
    dense = np.zeros((4, 100, 100), bool)
    dense[0, 10:20, 10:20] = True  # the exemplar
    dense[1, 10:20, 10:15] = True  # a part of it
    dense[2, 50:60, 50:60] = True  # a twin
    dense[3, 50:60, 50:61] = True  # the twin found again (a duplicate)
    masks = MaskSet.from_dense(dense, np.ones(4))
    assert ex.match_kind(masks, _cues([0, 0, 0.1, 0.2], [0, 0, 0.1, 0.2]), [0]).indices == (0, 2)


def test_a_clip_row_that_was_not_embedded_leaves_that_cue_out_for_it():
    g = _cues([0, 0.2, 9.0], [0, 0.2, 9.0])
    clip = np.array([[1, 0], [0, 0], [0, 1]], np.float32)  # instance 1 too small to embed
    with_clip = ex.InstanceCues(g.geometry, g.colour, clip)
    d = ex.combined_distance(with_clip, [0])
    assert np.isfinite(d).all() and d[1] < 1.0 < d[2]
    assert ex.match_kind(_masks(3), with_clip, [0]).indices == (0, 1)


def test_colour_stats_are_lab_means_and_spreads_of_the_masked_pixels():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = (220, 30, 30)
    image[:, 20:] = (40, 80, 220)
    dense = np.zeros((2, 20, 40), bool)
    dense[0, 2:18, 2:18] = dense[1, 2:18, 22:38] = True
    stats = ex.colour_stats(image, MaskSet.from_dense(dense, np.ones(2)))
    assert stats.shape == (2, 6)
    assert stats[0, 1] > 40 and stats[1, 2] < -40  # red: a* high; blue: b* low
    assert np.allclose(stats[:, 3:], 0, atol=1e-3)  # flat colours: no spread


# ------------------------------------------------------------------ whole answers over ground truth
@pytest.fixture(scope="module")
def kind_scene():
    return generate_kind_scene(dev_seeds(3)[2])


@pytest.fixture(scope="module")
def service(make_settings, kind_scene):
    settings = make_settings(clip_enabled=False)
    svc = build_service(settings, GroundTruthSegmenter([kind_scene]))
    svc.setup(SetupRequest(PROJECT, LABEL_CONFIG, extra_params={"exemplar_tags": ["similar", "similar_click"]}))
    return svc


def ask(service, scene, regions, config=LABEL_CONFIG, project=PROJECT):
    task = {"id": 1, "data": {"image": lsrequests.data_uri(scene.image)}}
    return service.predict(predict_request([task], {"result": regions}, config, project))[0]


def test_one_exemplar_box_answers_every_object_of_its_kind_one_region_each(service, kind_scene):
    targets = kind_scene.targets
    prediction = ask(service, kind_scene, [lsrequests.box_of(targets[1].mask, label="object", from_name="similar")])
    h, w = kind_scene.image.shape[:2]
    answered = [decode_rle(r["value"]["rle"], h, w) for r in prediction["result"]]
    assert len(answered) == len(targets)
    assert iou(answered[0], targets[1].mask) >= 0.9  # the exemplar's own mask comes first
    assert score(kind_scene, answered)[:3] == (len(targets), 0, 0)
    assert {r["from_name"] for r in prediction["result"]} == {"mask"}
    assert all(r["value"]["brushlabels"] == ["object"] for r in prediction["result"])
    assert prediction["model_version"] == service.model_version


def test_a_click_on_the_exemplar_tool_and_two_exemplars_answer_the_same_kind(service, kind_scene):
    targets = kind_scene.targets
    h, w = kind_scene.image.shape[:2]
    ys, xs = np.nonzero(targets[0].mask)
    k = len(xs) // 2
    for regions in ([lsrequests.keypoint(int(xs[k]), int(ys[k]), w, h, label="object", from_name="similar_click")],
                    [lsrequests.box_of(t.mask, label="object", from_name="similar") for t in targets[:2]]):
        answered = [decode_rle(r["value"]["rle"], h, w) for r in ask(service, kind_scene, regions)["result"]]
        assert score(kind_scene, answered)[:3] == (len(targets), 0, 0)


def test_a_negative_exemplar_click_on_a_look_alike_keeps_its_kind_out(service, kind_scene):
    h, w = kind_scene.image.shape[:2]
    target = kind_scene.targets[0]
    distractor = next(o for o in kind_scene.objects if o.role == "same_colour")
    ys, xs = np.nonzero(distractor.mask)
    regions = [lsrequests.box_of(target.mask, label="object", from_name="similar"),
               lsrequests.keypoint(int(xs[len(xs) // 2]), int(ys[len(ys) // 2]), w, h, positive=False,
                                   label="object", from_name="similar_click")]
    answered = [decode_rle(r["value"]["rle"], h, w) for r in ask(service, kind_scene, regions)["result"]]
    assert not any(iou(a, distractor.mask) >= 0.5 for a in answered)
    assert any(iou(a, target.mask) >= 0.5 for a in answered)


def test_without_the_exemplar_tag_the_same_box_answers_one_object(service, kind_scene):
    box = lsrequests.box_of(kind_scene.targets[0].mask, label="object", from_name="similar")
    assert len(ask(service, kind_scene, [box], project=None)["result"]) == len(kind_scene.targets)  # default tags
    service.setup(SetupRequest("no-exemplars", LABEL_CONFIG, extra_params={"exemplar_tags": ""}))
    assert len(ask(service, kind_scene, [box], project="no-exemplars")["result"]) == 1


def test_answers_go_into_the_tags_interactive_output_names_with_the_exemplars_label(make_settings, kind_scene):
    settings = make_settings(clip_enabled=False, interactive_output="both")
    svc = build_service(settings, GroundTruthSegmenter([kind_scene]))
    targets = kind_scene.targets
    box = lsrequests.box_of(targets[0].mask, label="Debris", from_name="similar")
    result = ask(svc, kind_scene, [box], config=CONFIG, project=None)["result"]
    brushes = [r for r in result if r["type"] == "brushlabels"]
    polygons = [r for r in result if r["type"] == "polygonlabels"]
    assert len(brushes) == len(targets) and len(polygons) >= len(targets)
    assert all(r["value"]["brushlabels"] == ["Debris"] for r in brushes)
    assert all(r["value"]["polygonlabels"] == ["Debris"] for r in polygons)


def test_health_says_what_exemplar_prompts_compare_without_clip(service):
    app = create_app(service.settings, service)
    body = app.test_client().get("/health").get_json()
    assert body["exemplar_cues"].startswith("geometry, colour (without CLIP: ")


# ------------------------------------------------------------------ the generator
@pytest.mark.slow  # draws every development and held-out scene
def test_scenes_repeat_one_kind_with_each_type_of_look_alike_and_seed_ranges_are_disjoint():
    assert not set(dev_seeds(1000)) & set(heldout_seeds(1000))
    for seed in heldout_seeds(4):
        scene = generate_kind_scene(seed)
        roles = [o.role for o in scene.objects]
        assert 3 <= roles.count("target") <= 5 and all(t in roles for t in DISTRACTOR_TYPES)
        for o in scene.objects:
            same_shape, same_colour = o.shape == scene.shape, o.colour == scene.colour
            assert {"target": same_shape and same_colour, "same_shape": same_shape and not same_colour,
                    "same_colour": same_colour and not same_shape,
                    "other": not same_shape and not same_colour}[o.role]
        union = np.zeros(scene.image.shape[:2], int)
        for o in scene.objects:
            union += o.mask
        assert union.max() == 1  # no overlaps: every mask is a whole object
        assert np.array_equal(generate_kind_scene(seed).image, scene.image)
