"""Round trips and corruption handling of ``fastsam_backend.core.codec``."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest

from fastsam_backend.core import codec
from fastsam_backend.core.codec import CorruptEntry, decode_entry, decode_maskset, encode_entry, encode_maskset
from fastsam_backend.core.masks import MaskSet


def ellipses(n: int, h: int, w: int, seed: int = 0) -> MaskSet:
    """``n`` random filled ellipses (radii 5..300 px) on an ``h x w`` image, built crop-wise."""
    rng = np.random.default_rng(seed)
    boxes, crops = [], []
    while len(crops) < n:
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 300), rng.uniform(5, 300)
        y0, y1 = max(0, int(cy - ry)), min(h, int(cy + ry) + 1)
        x0, x1 = max(0, int(cx - rx)), min(w, int(cx + rx) + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if rows.size == 0:
            continue
        crops.append(np.ascontiguousarray(m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]))
        boxes.append((x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1))
    scores = rng.random(n).astype(np.float32)
    return MaskSet((h, w), np.asarray(boxes, np.int32).reshape(-1, 4), scores, tuple(crops))


def random_masks(n: int, h: int, w: int, seed: int = 1) -> MaskSet:
    """Noisy masks of random odd sizes (worst case for compression, many widths not multiple of 8)."""
    rng = np.random.default_rng(seed)
    dense = rng.random((n, h, w)) < rng.uniform(0.05, 0.95, size=(n, 1, 1))
    return MaskSet.from_dense(dense, rng.random(n))


def assert_same(a: MaskSet, b: MaskSet) -> None:
    assert a.image_size == b.image_size and len(a) == len(b)
    assert b.boxes.dtype == np.int32 and b.scores.dtype == np.float32
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    for ca, cb in zip(a.crops, b.crops, strict=True):
        assert cb.dtype == np.bool_ and cb.shape == ca.shape
        np.testing.assert_array_equal(ca, cb)


@pytest.mark.parametrize(
    "ms",
    [
        MaskSet.empty((480, 640)),
        MaskSet.empty((1, 1)),
        MaskSet.from_dense(np.ones((1, 1, 1), bool), [0.5]),
        MaskSet.from_dense(np.eye(13, 9, dtype=bool)[None], [1.0]),
        random_masks(30, 37, 61),
        random_masks(5, 1, 17, seed=3),
        random_masks(5, 23, 1, seed=4),
        ellipses(40, 333, 517),
    ],
    ids=["empty", "empty-1x1", "one-1x1", "one-diag", "random-odd", "one-row", "one-col", "ellipses-odd"],
)
def test_round_trip(ms: MaskSet) -> None:
    out = decode_maskset(encode_maskset(ms))
    assert_same(ms, out)
    assert not out.crops or not out.crops[0].flags.writeable  # shared between requests: read-only
    assert decode_entry(encode_maskset(ms))[1] == {}


def test_round_trip_extras() -> None:
    ms = ellipses(12, 200, 300)
    rng = np.random.default_rng(5)
    extras = {
        "clip": rng.standard_normal((12, 512)).astype(np.float16),
        "area.f64": rng.random(12),
        "ids": np.arange(12, dtype=">i8"),  # big-endian input is stored little-endian
        "flags": rng.random((3, 4)) < 0.5,
        "empty": np.zeros((0, 7), np.uint16),
        "scalar": np.float32(3.5),
    }
    out, got = decode_entry(encode_entry(ms, extras))
    assert_same(ms, out)
    assert list(got) == list(extras)
    for name, arr in extras.items():
        arr = np.asarray(arr)
        assert got[name].shape == arr.shape and got[name].dtype.kind == arr.dtype.kind
        assert got[name].dtype.itemsize == arr.dtype.itemsize
        np.testing.assert_array_equal(got[name], arr)
    assert decode_maskset(encode_entry(ms, extras)).image_size == (200, 300)


@pytest.mark.parametrize(
    ("name", "arr", "exc"),
    [
        ("obj", np.array([object()]), TypeError),
        ("txt", np.array(["a"]), TypeError),
        ("cplx", np.zeros(3, np.complex64), TypeError),
        ("bad name", np.zeros(3), ValueError),
        ("", np.zeros(3), ValueError),
        ("x" * 65, np.zeros(3), ValueError),
    ],
)
def test_rejects_unsupported_extras(name: str, arr: np.ndarray, exc: type) -> None:
    with pytest.raises(exc):
        encode_entry(MaskSet.empty((4, 4)), {name: arr})


def test_size_ratio_and_speed_on_realistic_masks() -> None:
    ms = ellipses(100, 1024, 1024)
    raw = len(ms) * 1024 * 1024  # dense (N, H, W) bools
    data = encode_maskset(ms)
    assert len(data) <= raw / 20  # format property; measured ~1/1200 for this set
    assert len(data) <= sum(c.size for c in ms.crops) / 20  # even against the cropped bools (~1/100)
    start = time.perf_counter()
    out = decode_maskset(data)
    elapsed = time.perf_counter() - start
    assert_same(ms, out)
    assert elapsed < 0.5  # a few ms in practice; generous for a loaded CI box


def _valid() -> bytes:
    return encode_entry(random_masks(3, 9, 11), {"e": np.arange(6, dtype=np.float16).reshape(3, 2)})


def _reheader(data: bytes, **fields: int) -> bytes:
    """Rewrite header fields and fix the crc so that only the semantic checks can object."""
    names = ["magic", "version", "flags", "n_extras", "h", "w", "n", "bits_len", "crc"]
    values = dict(zip(names, struct.unpack_from("<4sBBHIIIII", data), strict=True))
    values.update(fields, crc=0)
    head = struct.pack("<4sBBHIIIII", *values.values())
    crc = zlib.crc32(data[28:], zlib.crc32(head))
    return head[:24] + struct.pack("<I", crc) + data[28:]


def test_reheader_helper_keeps_valid_entries_valid() -> None:
    assert_same(decode_maskset(_reheader(_valid())), random_masks(3, 9, 11))


@pytest.mark.parametrize(
    "fields",
    [
        {"magic": b"XXXX"},
        {"version": 2},
        {"version": 0},
        {"flags": 1},
        {"h": 0},
        {"w": 1 << 30},
        {"n": 2**32 - 1},  # huge N must not allocate
        {"n": 2},
        {"bits_len": 2**32 - 1},
        {"bits_len": 1},
        {"n_extras": 0},
        {"n_extras": 2},
        {"h": 5},  # boxes now lie outside the image
    ],
)
def test_inconsistent_header(fields: dict) -> None:
    with pytest.raises(CorruptEntry):
        decode_entry(_reheader(_valid(), **fields))


def test_wrong_version_and_magic_without_crc_fix() -> None:
    data = bytearray(_valid())
    data[4] = codec.SCHEMA_VERSION + 1
    with pytest.raises(CorruptEntry, match="version"):
        decode_entry(bytes(data))
    with pytest.raises(CorruptEntry, match="magic"):
        decode_entry(b"PK\x03\x04" + bytes(data[4:]))


def test_every_truncation_and_byte_flip_is_detected() -> None:
    data = _valid()
    for cut in range(len(data)):
        with pytest.raises(CorruptEntry):
            decode_entry(data[:cut])
    with pytest.raises(CorruptEntry):
        decode_entry(data + b"\0")
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x41
        with pytest.raises(CorruptEntry):
            decode_entry(bytes(flipped))


def test_random_bytes_and_non_bytes() -> None:
    rng = np.random.default_rng(7)
    for size in [0, 1, 27, 28, 29, 64, 1000]:
        for _ in range(20):
            blob = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            with pytest.raises(CorruptEntry):
                decode_entry(blob)
            with pytest.raises(CorruptEntry):  # and with a valid-looking magic + version
                decode_entry(b"FSMS\x01" + blob)
    for bad in [None, "FSMS", 12, [1, 2]]:
        with pytest.raises(CorruptEntry):
            decode_entry(bad)  # type: ignore[arg-type]


def test_decompression_bomb_is_refused_before_inflating() -> None:
    """Crafted (crc-valid) entry: one full-image mask whose bits are a tiny stream claiming 1 GiB."""
    h = w = 1 << 15
    bits = zlib.compress(b"")
    body = struct.pack("<4i", 0, 0, w, h) + struct.pack("<f", 1.0) + bits
    head = struct.pack("<4sBBHIIIII", b"FSMS", 1, 0, 0, h, w, 1, len(bits), 0)
    data = head[:24] + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body
    with pytest.raises(CorruptEntry, match="cannot hold"):
        decode_entry(data)


def test_crafted_bad_extras() -> None:
    ms = MaskSet.empty((4, 4))

    def with_extra(blob: bytes, n_extras: int = 1) -> bytes:
        return _reheader(encode_maskset(ms) + blob, n_extras=n_extras)

    ok = struct.pack("<B", 1) + b"a" + struct.pack("<BBI", 2, 1, 2) + np.zeros(2, "<f4").tobytes()
    assert decode_entry(with_extra(ok))[1]["a"].shape == (2,)
    bad = [
        struct.pack("<B", 1) + b"a" + struct.pack("<BBI", 99, 1, 2) + bytes(8),  # unknown dtype code
        struct.pack("<B", 1) + b"a" + struct.pack("<BBI", 2, 1, 2**32 - 1),  # huge shape
        struct.pack("<B", 1) + b"a" + struct.pack("<BB", 2, 9) + bytes(36),  # too many dims
        struct.pack("<B", 2) + b"\xff\xfe" + struct.pack("<BBI", 2, 1, 0),  # non-ASCII name
        struct.pack("<B", 3) + b"a b" + struct.pack("<BBI", 2, 1, 0),  # invalid name
        ok + ok,  # duplicate name (with n_extras=2 below)
    ]
    for i, blob in enumerate(bad):
        with pytest.raises(CorruptEntry):
            decode_entry(with_extra(blob, 2 if i == len(bad) - 1 else 1))
    flags = struct.pack("<B", 1) + b"f" + struct.pack("<BBI", 12, 1, 3) + b"\x00\x02\xff"
    np.testing.assert_array_equal(decode_entry(with_extra(flags))[1]["f"], [False, True, True])
