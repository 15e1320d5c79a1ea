"""Bad input at the HTTP level, table-driven, through Flask's test client.

Each case is answered with a 4xx JSON error whose ``error`` names the problem (never a
traceback), or with a correct result where the input is legitimate; the server keeps serving
after every one. Most cases fail before the model is needed; the legitimate ones are answered over
one served scene's ground-truth masks.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from fastsam_backend.quality.fake import GroundTruthSegmenter
from fastsam_backend.quality.scenes import generate_scene
from fastsam_backend.server import create_app
from fastsam_backend.service.orchestrator import build_service
from tests.helpers import LABEL_CONFIG, png_bytes

DEEP = 10_000
IMAGE = "/data/upload/1/battery.png"


@pytest.fixture(scope="module")
def client(make_settings, image_server):
    root, base = image_server
    (root / "data" / "upload" / "1").mkdir(parents=True, exist_ok=True)
    scene = generate_scene(1_000_013, (320, 240))
    (root / "data" / "upload" / "1" / "battery.png").write_bytes(png_bytes(scene.image))
    # the scene's ground truth stands in for the model (these cases judge the HTTP edge, not masks);
    # no CLIP, so pre-annotation labels come from DEFAULT_LABEL
    settings = make_settings(label_studio_url=base, default_label="Banana")
    return create_app(settings, build_service(settings, GroundTruthSegmenter([scene]))).test_client()


def task(image=IMAGE, **extra) -> dict:
    return {"id": 1, "data": {"image": image}, **extra}


def body(context=None, tasks=None, label_config=LABEL_CONFIG, **extra) -> dict:
    out = {"tasks": tasks if tasks is not None else [task()], "label_config": label_config,
           "params": {"context": context}, **extra}
    return out


def regions(*items) -> dict:
    return {"result": list(items)}


def keypoint(x=50.0, y=50.0, **extra) -> dict:
    return {"type": "keypointlabels", "from_name": "tag2", "to_name": "image", "original_width": 320,
            "original_height": 240, "value": {"x": x, "y": y, "keypointlabels": ["Banana"]}, **extra}


def box(x=10.0, y=10.0, w=30.0, h=30.0, **value) -> dict:
    return {"type": "rectanglelabels", "from_name": "tag3", "to_name": "image", "original_width": 320,
            "original_height": 240, "value": {"x": x, "y": y, "width": w, "height": h,
                                              "rectanglelabels": ["Orange"], **value}}


def raw(text: str) -> bytes:
    return text.encode()


def nested(open_: str, close: str, depth: int = DEEP) -> str:
    return open_ * depth + close * depth


OK = None  # a legitimate request: 200 with one result per task
PREDICT_CASES: dict[str, tuple[object, object]] = {
    # malformed JSON
    "not JSON": (b"not json", r"JSON object"),
    "empty body": (b"", r"JSON object"),
    "unterminated": (b'{"tasks": [', r"JSON object"),
    "trailing comma": (b'{"tasks": [{"data": {}},]}', r"JSON object|invalid /predict body"),
    "not UTF-8": (b'{"tasks": "\xff\xfe"}', r"JSON object|invalid"),
    "NaN literal": (raw('{"tasks": [{"data": {"image": "/x.png"}}], "params": {"context": {"result": '
                        '[{"type": "keypointlabels", "value": {"x": NaN, "y": 1}}]}}}'), r"JSON object"),
    "Infinity literal": (raw('{"tasks": [{"data": {"image": "/x.png"}}], "params": {"context": {"result": '
                             '[{"type": "keypointlabels", "value": {"x": Infinity, "y": 1}}]}}}'), r"JSON object"),
    "1e400 overflows to infinity": (raw(json.dumps(body(regions(keypoint(x=12345.0)))).replace("12345.0", "1e400")),
                                    r"Number out of range|value\.x must be a finite number"),
    f"tasks nested {DEEP} deep": (raw('{"tasks": ' + nested("[", "]") + "}"), r"\$\.tasks\[0\]"),
    "top-level list": (b'[{"data": {}}]', r"JSON object"),
    "top-level string": (b'"tasks"', r"JSON object"),
    "top-level null": (b"null", r"JSON object"),
    # wrong types, level by level
    "tasks missing": ({"label_config": LABEL_CONFIG}, r"missing required field `tasks`"),
    "tasks null": ({"tasks": None}, r"\$\.tasks"),
    "tasks empty": ({"tasks": []}, r"tasks must be a non-empty list"),
    "tasks an object": ({"tasks": {"0": task()}}, r"\$\.tasks"),
    "tasks a number": ({"tasks": 3}, r"\$\.tasks"),
    "tasks a string": ({"tasks": "x.png"}, r"\$\.tasks"),
    "task a list": ({"tasks": [[1]]}, r"\$\.tasks\[0\]"),
    "task a number": ({"tasks": [1]}, r"\$\.tasks\[0\]"),
    "task null": ({"tasks": [None]}, r"\$\.tasks\[0\]"),
    "data a list": (body(tasks=[{"data": [IMAGE]}]), r"\$\.tasks\[0\]\.data"),
    "data a string": (body(tasks=[{"data": IMAGE}]), r"\$\.tasks\[0\]\.data"),
    "data null": (body(tasks=[{"data": None}]), r"\$\.tasks\[0\]\.data"),
    "data.image missing": (body(tasks=[{"data": {}}]), r"tasks\[0\]\.data\.image must be the image URL"),
    "data.image a number": (body(tasks=[task(7)]), r"tasks\[0\]\.data\.image must be the image URL"),
    "data.image a list": (body(tasks=[task([IMAGE])]), r"tasks\[0\]\.data\.image"),
    "data.image an object": (body(tasks=[task({"url": IMAGE})]), r"tasks\[0\]\.data\.image"),
    "data.image empty": (body(tasks=[task("  ")]), r"tasks\[0\]\.data\.image"),
    "data.image a 1 MB URL": (body(tasks=[task("/data/upload/1/" + "a" * 2**20)]), r"127\.0\.0\.1:\d+: HTTP 4[01]4"),
    "params a list": ({"tasks": [task()], "params": [1]}, r"\$\.params"),
    "params a string": ({"tasks": [task()], "params": "x"}, r"\$\.params"),
    "params a number": ({"tasks": [task()], "params": 1}, r"\$\.params"),
    "context a list": (body([keypoint()]), r"\$\.params\.context"),
    "context a string": (body("click"), r"\$\.params\.context"),
    "context a number": (body(5), r"\$\.params\.context"),
    "context true": (body(True), r"\$\.params\.context"),
    "result an object": (body({"result": keypoint()}), r"\$\.params\.context\.result"),
    "result a string": (body({"result": "k"}), r"\$\.params\.context\.result"),
    "region a list": (body(regions([1, 2])), r"\$\.params\.context\.result\[0\]"),
    "region a number": (body(regions(3)), r"\$\.params\.context\.result\[0\]"),
    "region null": (body(regions(None)), r"\$\.params\.context\.result\[0\]"),
    "region type a number": (body(regions({"type": 1, "value": {}})), r"\$\.params\.context\.result\[0\]"),
    "region type missing": (body(regions({"value": {"x": 1}})), r"\$\.params\.context\.result\[0\]"),
    "value a list": (body(regions({**keypoint(), "value": [50, 50]})), r"\$\.params\.context\.result\[0\]\.value"),
    "value a string": (body(regions({**keypoint(), "value": "50,50"})), r"\$\.params\.context\.result\[0\]\.value"),
    "value null": (body(regions({**keypoint(), "value": None})), r"\$\.params\.context\.result\[0\]\.value"),
    "x a string": (body(regions(keypoint(x="50"))), r"\.result\[0\]\.value\.x"),
    "x null": (body(regions(keypoint(x=None))), r"value\.x must be a finite number"),
    "x a bool": (body(regions(keypoint(x=True))), r"\.value\.x"),
    "x a list": (body(regions(keypoint(x=[1]))), r"\.value\.x"),
    "y \"NaN\"": (body(regions(keypoint(y="NaN"))), r"\.value\.y"),
    "is_positive a string": (body(regions(keypoint(is_positive="yes"))), r"\.result\[0\]\.is_positive"),
    "keypointlabels a string": (body(regions({**keypoint(), "value": {"x": 1, "y": 1, "keypointlabels": "Banana"}})),
                                r"\.value\.keypointlabels"),
    "box width negative": (body(regions(box(w=-5))), r"width/height must not be negative"),
    "box height a string": (body(regions(box(h="10"))), r"\.value\.height"),
    "box rotation a string": (body(regions(box(rotation="90"))), r"\.value\.rotation"),
    "box original_width a string": (body(regions({**box(rotation=30), "original_width": "wide"})),
                                    r"\.result\[0\]\.original_width"),
    "text a number": (body(regions({"type": "textarea", "value": {"text": 5}})), r"\.value\.text"),
    "text list of numbers": (body(regions({"type": "textarea", "value": {"text": [1, 2]}})), r"value\.text"),
    "text of 1 MB": (body(regions({"type": "textarea", "value": {"text": ["a" * 2**20]}})),
                     r"text prompt is 1048576 characters long"),
    "project a list": (body(project=[1]), r"\$\.project"),
    # label configs
    "label_config not XML": (body(label_config="<View"), r"not valid XML"),
    "label_config a number": (body(label_config=7), r"label_config"),
    "label_config without Image": (body(label_config="<View><BrushLabels name='b' toName='i'/></View>"),
                                   r"no <Image> tag"),
    "label_config without an output tag": (body(regions(keypoint()),
                                                label_config='<View><Image name="image" value="$image"/></View>'),
                                           r"label_config"),
    "label_config a billion laughs": (body(label_config='<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
                                           + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">'
                                                     for p, c in zip("abcdefgh", "bcdefghi"))
                                           + ']><View>&i;</View>'), r"label_config"),
    "label_config an external entity": (body(label_config='<!DOCTYPE v [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                                             '<View><Image name="image" value="$image"/>&e;</View>'),
                                        r"label_config"),
    # legitimate, if odd: answered with a result
    "unknown region types are not prompts": (body(regions({"type": "brushlabels", "value": {"rle": [1]}},
                                                          {"type": "choices", "value": {"choices": ["a"]}})), OK),
    "negative click": (body(regions(keypoint(x=-50, y=-1e9))), OK),
    "click at 1e308": (body(regions(keypoint(x=1e308, y=1e308))), OK),
    "click at -1e308": (body(regions(keypoint(x=-1e308, y=50))), OK),
    "box at 1e308 of width 1e308": (body(regions(box(x=1e308, y=1e308, w=1e308, h=1e308))), OK),
    "box from -1e308": (body(regions(box(x=-1e308, y=-1e308, w=1e308, h=1e308))), OK),
    "zero-area box": (body(regions(box(w=0, h=0))), OK),
    "box outside the image": (body(regions(box(x=150, y=150, w=10, h=10))), OK),
    "box rotated 1e308 degrees": (body(regions(box(rotation=1e308))), OK),
    "missing is_positive is a positive click": (body(regions(keypoint())), OK),
    "context without result": (body({}), OK),
    "params.context null (pre-annotation)": (body(None), OK),
}

# Label Studio only sends the config as a string; an object or list used to reach the XML parser's
# lru_cache and answer 500.
LABEL_CONFIG_TYPES = {"label_config an object": {"xml": LABEL_CONFIG}, "label_config a list": [LABEL_CONFIG]}


def post(client, path: str, payload):
    if isinstance(payload, bytes):
        return client.post(path, data=payload, content_type="application/json")
    return client.post(path, json=payload)


def check(client, response, expect) -> None:
    assert "Traceback" not in response.get_data(as_text=True)
    if expect is OK:
        assert response.status_code == 200, response.json
        results = response.json["results"]
        assert len(results) == 1 and isinstance(results[0]["result"], list)
    else:
        assert 400 <= response.status_code < 500, (response.status_code, response.get_data(as_text=True)[:300])
        assert re.search(expect, response.json["error"]), response.json["error"][:300]
        assert response.json["request_id"] and len(response.json["error"]) < 2000
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(("payload", "expect"), PREDICT_CASES.values(), ids=PREDICT_CASES.keys())
def test_predict_battery(client, payload, expect):
    started = time.monotonic()
    check(client, post(client, "/predict", payload), expect)
    assert time.monotonic() - started < 30  # the first legitimate case loads the model


# msgspec raises RecursionError on the ``Any`` fields of a body nested this deep (it was a 500).
DEEP_PREDICT = {
    f"params nested {DEEP} deep (arrays)": raw('{"tasks": [{"data": {}}], "params": ' + nested("[", "]") + "}"),
    f"context nested {DEEP} deep (objects)": raw('{"tasks": [{"data": {}}], "params": {"context": '
                                                 + '{"a":' * DEEP + "1" + "}" * DEEP + "}}"),
    f"task data nested {DEEP} deep": raw('{"tasks": [{"data": ' + nested("[", "]") + "}]}"),
    f"label_config nested {DEEP} deep": raw('{"tasks": [{"data": {}}], "label_config": ' + nested("[", "]") + "}"),
}


@pytest.mark.parametrize("payload", DEEP_PREDICT.values(), ids=DEEP_PREDICT.keys())
def test_deeply_nested_predict_bodies(client, payload):
    check(client, post(client, "/predict", payload), r"JSON|nest|depth|\$\.")  # typed fields fail on their type


@pytest.mark.parametrize("label_config", LABEL_CONFIG_TYPES.values(), ids=LABEL_CONFIG_TYPES.keys())
def test_label_config_of_the_wrong_type(client, label_config):
    check(client, post(client, "/predict", body(label_config=label_config)), r"label_config")


OTHER_ROUTES = {
    "/setup not JSON": ("/setup", b"{", r"JSON object"),
    f"/setup nested {DEEP} deep": ("/setup", raw('{"project": "1.1", "extra_params": ' + nested("[", "]") + "}"),
                                   r"\$\.extra_params"),
    "/setup a list": ("/setup", [1], r"JSON object"),
    "/setup hostname a list": ("/setup", {"project": "1.1", "hostname": ["x"]}, r"\$\.hostname"),
    "/setup token an object": ("/setup", {"project": "1.1", "access_token": {}}, r"\$\.access_token"),
    "/setup extra_params a list": ("/setup", {"project": "1.1", "extra_params": [1]}, r"\$\.extra_params"),
    "/setup schema a number": ("/setup", {"project": "1.1", "schema": 3}, r"\$\.schema"),
    "/webhook not JSON": ("/webhook", b"\x00\x01", r"JSON object"),
    f"/webhook nested {DEEP} deep": ("/webhook", raw('{"action": ' + nested("[", "]") + "}"), r"JSON object"),
    "/webhook action a number": ("/webhook", {"action": 5}, OK),
}


@pytest.mark.parametrize(("path", "payload", "expect"), OTHER_ROUTES.values(), ids=OTHER_ROUTES.keys())
def test_other_routes_battery(client, path, payload, expect):
    response = post(client, path, payload)
    assert "Traceback" not in response.get_data(as_text=True)
    if expect is OK:
        assert response.status_code in (200, 201)
    else:
        assert 400 <= response.status_code < 500 and re.search(expect, response.json["error"]), response.json
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("action", [{"x": 1}, ["START_TRAINING"]], ids=["object", "list"])
def test_webhook_action_of_the_wrong_type(client, action):
    response = post(client, "/webhook", {"action": action})
    assert response.status_code in (200, 201, 400) and "Traceback" not in response.get_data(as_text=True)
