"""Compact, safe binary serialization of a ``MaskSet`` (plus optional numeric extras).

No pickle anywhere: decoding only parses fixed-layout integers and numeric arrays, so
bytes read back from a shared cache can never execute code. Every inconsistency in the
input raises ``CorruptEntry`` (a ``ValueError``), and sizes claimed by a header are
checked against the payload length *before* anything is allocated.

Layout, schema version 1, all integers little-endian::

    header (28 bytes)  b"FSMS" | version u8 | flags u8 (0) | n_extras u16
                       | H u32 | W u32 | N u32 | bits_len u32 | crc32 u32
    boxes              N x 4 int32 (x0, y0, x1, y1; x1, y1 exclusive)
    scores             N float32
    bits               bits_len bytes: zlib stream of, for each crop in order,
                       ``np.packbits(crop, axis=1)`` (rows padded to whole bytes, MSB first)
    extras x n_extras  name_len u8 | name (ASCII) | dtype code u8 | ndim u8
                       | ndim x u32 shape | raw little-endian data

``crc32`` covers the whole entry (with the crc field itself taken as zero), so any
accidental corruption is detected. Decoded arrays are read-only: decoded entries are
shared between requests.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Mapping

import numpy as np

from fastsam_backend.core.masks import MaskSet

SCHEMA_VERSION = 1
MAGIC = b"FSMS"
COMPRESS_LEVEL = 1  # level 6 is ~30 % smaller but ~4x slower to encode; decode speed is the same
MAX_SIDE = 1 << 20  # image height/width bound accepted by the decoder
MAX_DECODED_BITS_BYTES = 1 << 31  # hard cap on the decompressed mask bits
_DEFLATE_MAX_RATIO = 1032  # deflate can never expand more than this (RFC 1951 limit)
MAX_EXTRAS = 255
MAX_EXTRA_NDIM = 8

_HEADER = struct.Struct("<4sBBHIIIII")
ARRAYS_MAGIC = b"FSAR"
_ARRAYS_HEADER = struct.Struct("<4sBBHI")  # magic | version | flags (0) | n_arrays | crc32
_CRC_OFFSET = _HEADER.size - 4
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")

# Explicit dtype codes: only plain numeric (and bool) dtypes can ride along.
_DTYPE_CODES: dict[str, int] = {
    "f2": 1, "f4": 2, "f8": 3, "i1": 4, "i2": 5, "i4": 6, "i8": 7,
    "u1": 8, "u2": 9, "u4": 10, "u8": 11, "b1": 12,
}  # fmt: skip
_CODE_DTYPES = {code: np.dtype("<" + key if key != "b1" else "?") for key, code in _DTYPE_CODES.items()}


class CorruptEntry(ValueError):
    """The bytes are not a valid entry of this schema version (bad magic/version, truncated, inconsistent)."""


# --------------------------------------------------------------------------- encode
def encode_maskset(ms: MaskSet) -> bytes:
    """Serialize ``ms`` alone (same format as ``encode_entry(ms, None)``)."""
    return encode_entry(ms, None)


def encode_entry(ms: MaskSet, extras: Mapping[str, np.ndarray] | None = None) -> bytes:
    """Serialize ``ms`` plus optional named numeric arrays (e.g. ``(N, D)`` float16 embeddings).

    Raises ``ValueError``/``TypeError`` for unrepresentable input: image sides over
    ``MAX_SIDE``, an extra name not matching ``[A-Za-z_][A-Za-z0-9_.-]{0,63}``, or an
    extra dtype outside float16/32/64, (u)int8..64 and bool.
    """
    h, w = (int(v) for v in ms.image_size)
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise ValueError(f"image size {ms.image_size} exceeds the codec limit {MAX_SIDE}")
    n = len(ms)
    comp = zlib.compressobj(COMPRESS_LEVEL)
    bits = b"".join(comp.compress(np.packbits(crop, axis=1)) for crop in ms.crops) + comp.flush()
    extra_blobs = [_encode_extra(name, arr) for name, arr in (extras or {}).items()]
    if len(extra_blobs) > MAX_EXTRAS:
        raise ValueError(f"at most {MAX_EXTRAS} extras, got {len(extra_blobs)}")
    header = _HEADER.pack(MAGIC, SCHEMA_VERSION, 0, len(extra_blobs), h, w, n, len(bits), 0)
    boxes, scores = np.asarray(ms.boxes, dtype="<i4").tobytes(), np.asarray(ms.scores, dtype="<f4").tobytes()
    body = b"".join([boxes, scores, bits, *extra_blobs])
    crc = zlib.crc32(body, zlib.crc32(header))
    return header[:_CRC_OFFSET] + struct.pack("<I", crc) + body


def _encode_extra(name: str, arr: np.ndarray) -> bytes:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid extra name {name!r}")
    arr = np.asarray(arr)
    key = f"{arr.dtype.kind}{arr.dtype.itemsize}"
    if key not in _DTYPE_CODES:
        raise TypeError(f"extra {name!r}: dtype {arr.dtype} is not a supported numeric dtype")
    if arr.ndim > MAX_EXTRA_NDIM or any(d >= 1 << 32 for d in arr.shape):
        raise ValueError(f"extra {name!r}: shape {arr.shape} not representable")
    data = np.ascontiguousarray(arr, dtype=_CODE_DTYPES[_DTYPE_CODES[key]]).tobytes()
    return b"".join(
        [struct.pack("<B", len(name)), name.encode("ascii"), struct.pack("<BB", _DTYPE_CODES[key], arr.ndim),
         struct.pack(f"<{arr.ndim}I", *arr.shape), data]
    )  # fmt: skip


# --------------------------------------------------------------------------- decode
def decode_maskset(data: bytes | bytearray | memoryview) -> MaskSet:
    """Parse an entry, ignoring any extras. Raises ``CorruptEntry`` on any invalid input."""
    return decode_entry(data)[0]


def decode_entry(data: bytes | bytearray | memoryview) -> tuple[MaskSet, dict[str, np.ndarray]]:
    """Parse an entry into ``(MaskSet, extras)``; raises ``CorruptEntry`` and nothing else on bad input."""
    try:
        buf = memoryview(data).cast("B")
    except TypeError as exc:
        raise CorruptEntry(f"not a bytes-like object: {type(data).__name__}") from exc
    try:
        return _decode(buf)
    except CorruptEntry:
        raise
    except (ValueError, struct.error, zlib.error, UnicodeDecodeError, OverflowError, IndexError) as exc:
        raise CorruptEntry(f"invalid entry: {exc}") from exc  # defensive: checks below should catch first


def _decode(buf: memoryview) -> tuple[MaskSet, dict[str, np.ndarray]]:
    total = len(buf)
    if total < _HEADER.size:
        raise CorruptEntry(f"truncated: {total} bytes, header needs {_HEADER.size}")
    magic, version, flags, n_extras, h, w, n, bits_len, crc = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {bytes(magic)!r}")
    if version != SCHEMA_VERSION:
        raise CorruptEntry(f"schema version {version}, this build reads {SCHEMA_VERSION}")
    if zlib.crc32(buf[_CRC_OFFSET + 4 :], zlib.crc32(bytes(buf[:_CRC_OFFSET]) + b"\0\0\0\0")) != crc:
        raise CorruptEntry("checksum mismatch")
    if flags != 0 or not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise CorruptEntry(f"bad header: flags={flags} size={h}x{w}")
    off = _HEADER.size
    if off + 20 * n + bits_len > total:  # bounds N before anything is allocated
        raise CorruptEntry(f"truncated: header claims {n} masks and {bits_len} mask bytes, have {total}")
    boxes = np.frombuffer(buf, dtype="<i4", count=4 * n, offset=off).reshape(n, 4).astype(np.int32)
    off += 16 * n
    scores = np.frombuffer(buf, dtype="<f4", count=n, offset=off).astype(np.float32)
    off += 4 * n
    x0, y0, x1, y1 = boxes.T.astype(np.int64)
    if n and not ((x0 >= 0) & (x0 < x1) & (x1 <= w) & (y0 >= 0) & (y0 < y1) & (y1 <= h)).all():
        raise CorruptEntry("a box is empty or outside the image")
    heights, row_bytes = y1 - y0, (x1 - x0 + 7) // 8
    sizes = heights * row_bytes
    expected = int(sizes.sum())
    if expected > min(MAX_DECODED_BITS_BYTES, _DEFLATE_MAX_RATIO * bits_len + 64):
        raise CorruptEntry(f"{bits_len} compressed bytes cannot hold {expected} bytes of mask bits")
    d = zlib.decompressobj()
    raw = d.decompress(buf[off : off + bits_len], expected + 1)
    if len(raw) != expected or not d.eof or d.unused_data or d.unconsumed_tail:
        raise CorruptEntry(f"mask bits: got {len(raw)} bytes, expected {expected}")
    off += bits_len
    packed = np.frombuffer(raw, dtype=np.uint8)
    crops, pos = [], 0
    shapes = zip(heights.tolist(), row_bytes.tolist(), (x1 - x0).tolist(), sizes.tolist(), strict=True)
    for hh, rb, ww, size in shapes:
        crop = np.unpackbits(packed[pos : pos + size].reshape(hh, rb), axis=1, count=ww).view(np.bool_)
        crop.flags.writeable = False
        crops.append(crop)
        pos += size
    extras: dict[str, np.ndarray] = {}
    for _ in range(n_extras):
        name, arr, off = _decode_extra(buf, off)
        if name in extras:
            raise CorruptEntry(f"duplicate extra {name!r}")
        extras[name] = arr
    if off != total:
        raise CorruptEntry(f"{total - off} trailing bytes")
    boxes.flags.writeable = False
    scores.flags.writeable = False
    try:
        ms = MaskSet((h, w), boxes, scores, tuple(crops))
    except ValueError as exc:
        raise CorruptEntry(f"inconsistent mask set: {exc}") from exc
    return ms, extras


def _decode_extra(buf: memoryview, off: int) -> tuple[str, np.ndarray, int]:
    total = len(buf)
    if off + 1 > total or off + 1 + buf[off] + 2 > total:
        raise CorruptEntry("truncated extra header")
    name_len = buf[off]
    name = bytes(buf[off + 1 : off + 1 + name_len]).decode("ascii")
    if not _NAME_RE.fullmatch(name):
        raise CorruptEntry(f"invalid extra name {name!r}")
    off += 1 + name_len
    code, ndim = buf[off], buf[off + 1]
    off += 2
    if code not in _CODE_DTYPES or ndim > MAX_EXTRA_NDIM or off + 4 * ndim > total:
        raise CorruptEntry(f"extra {name!r}: bad dtype code {code} / ndim {ndim}")
    shape = struct.unpack_from(f"<{ndim}I", buf, off)
    off += 4 * ndim
    dtype = _CODE_DTYPES[code]
    count = 1
    for dim in shape:
        count *= dim
    nbytes = count * dtype.itemsize
    if off + nbytes > total:
        raise CorruptEntry(f"extra {name!r}: shape {shape} needs {nbytes} bytes, {total - off} left")
    if dtype == np.bool_:  # normalize: any nonzero byte is True (raw bytes 2..255 are not valid bools)
        arr = np.frombuffer(buf, dtype=np.uint8, count=count, offset=off).reshape(shape) != 0
    else:
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=off).reshape(shape).copy()
    arr.flags.writeable = False
    return name, arr, off + nbytes


# --------------------------------------------------------------------------- named arrays alone
def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named numeric arrays without a mask set (e.g. ``(N, D)`` CLIP crop embeddings), same rules
    as the extras of ``encode_entry``: ``b"FSAR" | version u8 | 0 u8 | n u16 | crc32 u32 | extras``."""
    blobs = [_encode_extra(name, arr) for name, arr in arrays.items()]
    if len(blobs) > MAX_EXTRAS:
        raise ValueError(f"at most {MAX_EXTRAS} arrays, got {len(blobs)}")
    header = _ARRAYS_HEADER.pack(ARRAYS_MAGIC, SCHEMA_VERSION, 0, len(blobs), 0)
    body = b"".join(blobs)
    crc = zlib.crc32(body, zlib.crc32(header))
    return header[:-4] + struct.pack("<I", crc) + body


def decode_arrays(data: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Parse ``encode_arrays``' output; raises ``CorruptEntry`` and nothing else on bad input."""
    try:
        buf = memoryview(data).cast("B")
    except TypeError as exc:
        raise CorruptEntry(f"not a bytes-like object: {type(data).__name__}") from exc
    if len(buf) < _ARRAYS_HEADER.size:
        raise CorruptEntry(f"truncated: {len(buf)} bytes, header needs {_ARRAYS_HEADER.size}")
    magic, version, flags, n, crc = _ARRAYS_HEADER.unpack_from(buf)
    if magic != ARRAYS_MAGIC or version != SCHEMA_VERSION or flags != 0:
        raise CorruptEntry(f"not an arrays entry of schema {SCHEMA_VERSION}: {bytes(magic)!r} v{version}")
    if zlib.crc32(buf[_ARRAYS_HEADER.size :], zlib.crc32(bytes(buf[: _ARRAYS_HEADER.size - 4]) + b"\0" * 4)) != crc:
        raise CorruptEntry("checksum mismatch")
    arrays: dict[str, np.ndarray] = {}
    off = _ARRAYS_HEADER.size
    try:
        for _ in range(n):
            name, arr, off = _decode_extra(buf, off)
            if name in arrays:
                raise CorruptEntry(f"duplicate array {name!r}")
            arrays[name] = arr
    except (ValueError, struct.error, UnicodeDecodeError, IndexError) as exc:
        if isinstance(exc, CorruptEntry):
            raise
        raise CorruptEntry(f"invalid arrays entry: {exc}") from exc
    if off != len(buf):
        raise CorruptEntry(f"{len(buf) - off} trailing bytes")
    return arrays
