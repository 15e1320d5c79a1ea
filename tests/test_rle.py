"""Brush RLE: byte equality with the Label Studio SDK encoder, round trips, decode errors."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter import brush

from fastsam_backend.ls.rle import decode_rle, encode_rle, encode_rle_bytes, encode_rle_crops


def _disks(h: int, w: int, n: int, seed: int, rmax: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), bool)
    for _ in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(1, rmax)
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        yy, xx = np.ogrid[y0:y1, x0:x1]  # only the disk's box: collection-time cost (2048² masks)
        m[y0:y1, x0:x1] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    return m


def _noise(h: int, w: int, density: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)) < density


def _pixel(h: int, w: int, y: int, x: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y, x] = True
    return m


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _runs(lengths: list[int]) -> np.ndarray:
    """1xN mask of alternating runs (starting with 1) of the given pixel lengths."""
    return (np.repeat(np.arange(len(lengths)) % 2 == 0, lengths))[None, :]


def _circle(size: int, r: int) -> np.ndarray:
    yy, xx = np.ogrid[:size, :size]
    return (yy - size // 2) ** 2 + (xx - size // 2) ** 2 < r * r


# Field-class edges in pixels: 2 | 3 (8 | 12 values), 4 | 5 (16 | 20), 64 | 65 (256 | 260);
# 16384 pixels = 65,536 values (one full chunk), 16385 splits into 65,536 + 4.
_EDGES = [1, 2, 3, 4, 5, 16, 17, 63, 64, 65, 66, 16383, 16384, 16385, 32768, 32769, 49153]

SDK_CASES = {
    "empty": lambda: np.zeros((32, 32), bool),
    "full": lambda: np.ones((32, 32), bool),
    "full_300_split": lambda: np.ones((300, 300), bool),
    "pixel_top_left": lambda: _pixel(17, 23, 0, 0),
    "pixel_top_right": lambda: _pixel(17, 23, 0, 22),
    "pixel_bottom_left": lambda: _pixel(17, 23, 16, 0),
    "pixel_bottom_right": lambda: _pixel(17, 23, 16, 22),
    "pixel_center": lambda: _pixel(17, 23, 8, 11),
    "rect_inner": lambda: _rect(64, 80, 10, 50, 20, 70),
    "rect_touching_edges": lambda: _rect(64, 80, 0, 64, 0, 30),
    "rect_thin": lambda: _rect(100, 100, 40, 41, 3, 97),
    "rect_1024": lambda: _rect(1024, 1024, 100, 900, 200, 700),
    **{f"blobs_seed{s}": (lambda s=s: _disks(256, 256, 25, s)) for s in range(4)},
    **{f"noise_{d}": (lambda d=d: _noise(96, 128, d)) for d in (0.001, 0.01, 0.1, 0.5, 0.9, 0.99)},
    "noise_256_half": lambda: _noise(256, 256, 0.5, seed=1),
    "size_1x1_off": lambda: np.zeros((1, 1), bool),
    "size_1x1_on": lambda: np.ones((1, 1), bool),
    "size_1xN": lambda: _noise(1, 1000, 0.3),
    "size_Nx1": lambda: _noise(1000, 1, 0.3),
    "size_7x13": lambda: _noise(7, 13, 0.5),
    "size_333x517": lambda: _disks(333, 517, 30, seed=7, rmax=80),
    "circle_2048": lambda: _circle(2048, 900),
    "run_edges": lambda: _runs(_EDGES),
    "run_edges_inverted": lambda: ~_runs(_EDGES),
    "run_long_row": lambda: np.ones((1, 3 * 16384 + 7), bool),
    "alternating_row": lambda: (np.arange(999) % 2 == 0)[None, :],
    "checkerboard": lambda: (np.add.outer(np.arange(64), np.arange(65)) % 2).astype(bool),
}


@pytest.fixture(params=list(SDK_CASES), ids=list(SDK_CASES))
def sdk_mask(request: pytest.FixtureRequest) -> np.ndarray:
    return SDK_CASES[request.param]()


def test_matches_sdk_encoder_and_decoders(sdk_mask: np.ndarray) -> None:
    mask = sdk_mask
    sdk_rle = brush.mask2rle(mask.astype(np.uint8) * 255)
    ours = encode_rle(mask)
    assert ours == sdk_rle
    assert all(type(v) is int for v in ours)
    assert encode_rle_bytes(mask) == bytes(sdk_rle)
    # Our decoder and the SDK's agree, and both give back the mask.
    np.testing.assert_array_equal(decode_rle(ours, *mask.shape), mask)
    sdk_values = brush.decode_rle(ours).reshape(*mask.shape, 4)
    np.testing.assert_array_equal(sdk_values, (mask.astype(np.uint8) * 255)[..., None].repeat(4, axis=2))


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(_disks(333, 517, 30, seed=7, rmax=80).astype(np.uint8) * 255, id="uint8_0_255"),
        pytest.param(_noise(40, 50, 0.5).astype(np.int32) * np.int32(7), id="int32_0_7"),
        pytest.param(np.where(_noise(40, 50, 0.3), 0.25, 0.0), id="float"),
        pytest.param(np.asfortranarray(_disks(60, 90, 5, seed=3)), id="fortran_order"),
        pytest.param(_disks(90, 60, 5, seed=4)[::-1, ::2], id="strided_view"),
    ],
)
def test_any_dtype_nonzero_is_foreground(mask: np.ndarray) -> None:
    expected = brush.mask2rle((mask != 0).astype(np.uint8) * 255)
    assert encode_rle(mask) == expected
    np.testing.assert_array_equal(decode_rle(expected, *mask.shape), mask != 0)


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(_noise(512, 512, 0.5, seed=2), id="noise_512"),
        pytest.param(_noise(700, 300, 0.03, seed=3), id="sparse_noise_700x300"),
        pytest.param(_disks(2048, 2048, 60, seed=5, rmax=300), id="blobs_2048"),
        pytest.param(np.ones((2048, 2048), bool), id="full_2048"),
        pytest.param(np.zeros((0, 5), bool), id="zero_pixels"),
    ],
)
def test_round_trip(mask: np.ndarray) -> None:
    rle = encode_rle(mask)
    assert len(rle) >= 7 and min(rle) >= 0 and max(rle) <= 255
    decoded = decode_rle(rle, *mask.shape)
    assert decoded.dtype == np.bool_ and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)


class _Bits:
    """A tiny MSB-first bit writer for hand-made streams."""

    def __init__(self) -> None:
        self.bits = ""

    def put(self, value: int, width: int) -> _Bits:
        self.bits += format(value, f"0{width}b")
        return self

    def header(self, num: int) -> _Bits:
        return self.put(num, 32).put(7, 5).put(2, 4).put(3, 4).put(7, 4).put(15, 4)

    def ints(self) -> list[int]:
        bits = self.bits + "0" * (8 - len(self.bits) % 8)
        return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def test_decodes_literal_chunks_and_reads_alpha() -> None:
    # 3 RGBA pixels as the LS frontend may write them: colour + alpha, not all equal.
    b = _Bits().header(12)
    b.put(0, 1).put(2, 2).put(8 - 1, 8)  # literal block of 8 values
    for v in (255, 0, 0, 255, 255, 0, 0, 0):
        b.put(v, 8)
    b.put(1, 1).put(0, 2).put(4 - 1, 3).put(128, 8)  # 4 x 128: pixel 3 = (128, 128, 128, 128)
    rle = b.ints()
    np.testing.assert_array_equal(decode_rle(rle, 1, 3), [[True, False, True]])
    assert brush.decode_rle(rle).tolist() == [255, 0, 0, 255, 255, 0, 0, 0, 128, 128, 128, 128]


_GOOD = encode_rle(_disks(50, 60, 6, seed=9))
_OVERRUN = _Bits().header(4).put(1, 1).put(0, 2).put(8 - 1, 3).put(255, 8).ints()  # 8 values, num 4
_SHORT_LITERAL = _Bits().header(8).put(0, 1).put(0, 2).put(8 - 1, 3).put(255, 8).ints()  # 1 of 8 values


@pytest.mark.parametrize(
    ("rle", "shape"),
    [
        pytest.param([], (50, 60), id="empty_stream"),
        pytest.param(_GOOD[:5], (50, 60), id="short_header"),
        pytest.param(_GOOD[: len(_GOOD) // 2], (50, 60), id="truncated_half"),
        pytest.param(_GOOD[:-2], (50, 60), id="truncated_tail"),
        pytest.param(_GOOD, (60, 51), id="wrong_size"),
        pytest.param(_GOOD, (50, 61), id="wrong_width"),
        pytest.param([*_GOOD[:-1], 256], (50, 60), id="value_over_255"),
        pytest.param([-1, *_GOOD[1:]], (50, 60), id="negative_value"),
        pytest.param([float(v) for v in _GOOD], (50, 60), id="floats"),
        pytest.param(_OVERRUN, (1, 1), id="run_past_num"),
        pytest.param(_SHORT_LITERAL, (1, 2), id="short_literal"),
    ],
)
def test_decode_rejects_malformed(rle: list, shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        decode_rle(rle, *shape)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_encode_rejects_non_2d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_rle(np.zeros(shape, bool))


def test_decode_accepts_bytes_and_arrays() -> None:
    mask = _disks(30, 40, 4, seed=11)
    raw = encode_rle_bytes(mask)
    for rle in (raw, bytearray(raw), np.frombuffer(raw, np.uint8), list(raw)):
        np.testing.assert_array_equal(decode_rle(rle, 30, 40), mask)


def _in_box_cases() -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """Masks that are zero outside a box, at every edge case of the raster: boxes touching the
    left/right/top/bottom edges, full-width boxes, the whole image, 1-pixel boxes, boxes larger
    than the mask's own bounding box, empty masks and boxes partly outside the image."""
    rng = np.random.default_rng(11)
    cases = []
    for h, w in [(1, 1), (1, 7), (7, 1), (5, 6), (37, 53), (64, 64), (300, 17)]:
        for _ in range(40):
            x0, x1 = sorted(rng.integers(0, w + 1, 2))
            y0, y1 = sorted(rng.integers(0, h + 1, 2))
            if rng.random() < 0.3:  # full-width rows
                x0, x1 = 0, w
            mask = np.zeros((h, w), bool)
            if x1 > x0 and y1 > y0:
                fill = rng.random() if rng.random() < 0.7 else rng.choice([0.0, 1.0])
                mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < fill
            grow = rng.integers(0, 3, 4) * (rng.random() < 0.3)  # a looser box, maybe past the image
            cases.append((mask, (int(x0 - grow[0]), int(y0 - grow[1]), int(x1 + grow[2]), int(y1 + grow[3]))))
    return cases


def test_encoding_inside_a_box_gives_the_same_bytes() -> None:
    for mask, box in _in_box_cases():
        assert encode_rle_bytes(mask, box) == encode_rle_bytes(mask), (mask.shape, box)
    mask, box = _in_box_cases()[200]
    assert encode_rle(mask.astype(np.uint8) * 255, box) == brush.mask2rle(mask.astype(np.uint8) * 255)


def _crop_cases(seed: int) -> list[tuple[tuple[int, int], list[np.ndarray], list[tuple[int, int, int, int]]]]:
    """Images with several masks, each zero outside its box: boxes touching every image edge,
    full-width and whole-image boxes, 1-pixel boxes, empty boxes and empty or full crops."""
    rng = np.random.default_rng(seed)
    cases = []
    for h, w in [(1, 1), (1, 9), (9, 1), (5, 6), (37, 53), (64, 64), (130, 140)]:
        for _ in range(25):
            masks, boxes = [], []
            for _ in range(int(rng.integers(1, 6))):
                x0, x1 = sorted(int(v) for v in rng.integers(0, w + 1, 2))
                y0, y1 = sorted(int(v) for v in rng.integers(0, h + 1, 2))
                kind = rng.random()
                if kind < 0.2:  # full-width rows
                    x0, x1 = 0, w
                elif kind < 0.3:  # the whole image
                    x0, y0, x1, y1 = 0, 0, w, h
                elif kind < 0.45:  # one pixel, often in a corner
                    x0, y0 = int(rng.choice([0, w - 1, rng.integers(w)])), int(rng.choice([0, h - 1, rng.integers(h)]))
                    x1, y1 = x0 + 1, y0 + 1
                mask = np.zeros((h, w), bool)
                fill = rng.random() if rng.random() < 0.6 else rng.choice([0.0, 1.0])
                mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < fill
                masks.append(mask)
                boxes.append((x0, y0, x1, y1))
            cases.append(((h, w), masks, boxes))
    return cases


@pytest.mark.parametrize("seed", [0, 1])
def test_crops_encode_as_their_whole_masks(seed: int) -> None:
    for size, masks, boxes in _crop_cases(seed):
        crops = [m[y0:y1, x0:x1] for m, (x0, y0, x1, y1) in zip(masks, boxes)]
        got = encode_rle_crops(size, boxes, crops)
        assert got == [encode_rle_bytes(m) for m in masks], (size, boxes)
        assert got == [encode_rle_crops(size, [b], [c])[0] for b, c in zip(boxes, crops)]  # one at a time too
    size, masks, boxes = _crop_cases(seed)[-1]
    for mask, rle in zip(masks, encode_rle_crops(size, np.array(boxes), [m[y0:y1, x0:x1] for m, (x0, y0, x1, y1)
                                                                         in zip(masks, boxes)])):
        assert list(rle) == brush.mask2rle(mask.astype(np.uint8) * 255)


def test_crops_split_long_runs_and_take_any_dtype() -> None:
    h, w = 300, 400  # runs over 16,384 pixels around and inside the boxes
    masks = [_rect(h, w, 0, 300, 0, 400), _rect(h, w, 10, 290, 0, 400), _rect(h, w, 100, 101, 7, 8),
             _disks(h, w, 6, seed=3, rmax=90)]
    boxes = [(0, 0, 400, 300), (0, 10, 400, 290), (7, 100, 8, 101), (0, 0, 400, 300)]
    crops = [(m[y0:y1, x0:x1].astype(np.uint8) * 255) for m, (x0, y0, x1, y1) in zip(masks, boxes)]
    assert encode_rle_crops((h, w), boxes, crops) == [bytes(brush.mask2rle(m.astype(np.uint8) * 255)) for m in masks]
    assert encode_rle_crops((h, w), [], []) == []
    assert encode_rle_crops((0, 5), [(0, 0, 0, 0)], [np.zeros((0, 0), bool)]) == [encode_rle_bytes(np.zeros((0, 5)))]


def test_crops_must_fit_their_boxes_and_the_image() -> None:
    with pytest.raises(ValueError, match="not within"):
        encode_rle_crops((10, 10), [(5, 5, 11, 6)], [np.ones((1, 6), bool)])
    with pytest.raises(ValueError, match="not within"):
        encode_rle_crops((10, 10), [(-1, 0, 2, 1)], [np.ones((1, 3), bool)])
    with pytest.raises(ValueError, match="shape"):
        encode_rle_crops((10, 10), [(0, 0, 2, 2), (0, 0, 3, 3)], [np.ones((2, 2), bool), np.ones((2, 3), bool)])
