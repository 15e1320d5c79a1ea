"""Label Studio brush RLE: a vectorized encoder and a strict decoder.

The format is the one the LS frontend decodes with ``@thi.ng/rle-pack``: an
MSB-first bitstream returned as a list of ints 0-255.

* header, 53 bits: ``num`` (32) = H*W*4 values (RGBA, all four equal to the pixel
  value), ``wordSize - 1`` (5) = 7, four run-field sizes minus one (4 each) = 2, 3, 7, 15;
* chunks: ``flag`` (1), ``k`` (2), ``len - 1`` (``(3, 4, 8, 16)[k]`` bits), then for
  ``flag == 1`` one 8-bit value repeated ``len`` times, for ``flag == 0`` ``len`` values;
* padding: the SDK always appends 1-8 zero bits (a whole zero byte when aligned).

``encode_rle`` is byte-identical to ``label_studio_sdk.converter.brush.mask2rle``
applied to ``(mask != 0).astype(np.uint8) * 255``: every run of equal pixels is one
repeat chunk of ``4 * pixels`` values whose field is picked from the whole run's
length (<=8, <=16, <=256, else 16 bits); runs longer than 65,536 values are split
into 65,536-value chunks plus a remainder, all with the 16-bit field. (The SDK
writes a 1-value run as a literal; a mask never has one, every run is a multiple of 4.)
It does no Python-level loop over runs or pixels: chunks become integer codes that
are OR-ed into 64-bit words with a segmented ``np.bitwise_or.reduceat``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RLE_SIZES = (3, 4, 8, 16)  # run-length field widths, bits, selected by the 2-bit ``k``
WORD_SIZE = 8  # bits per value
HEADER_BITS = 32 + 5 + 4 * 4
_MAX_CHUNK = 1 << 16  # longest run one chunk can hold (16-bit ``len - 1`` field)
_SIZES = np.array(RLE_SIZES, dtype=np.int64)
# Field class of a run of p pixels (4p values): k = 0 up to 8 values, 1 up to 16, 2 up to 256, else 3.
_K_OF_PIXELS = np.searchsorted(np.array([8, 16, 256]), 4 * np.arange(66)).astype(np.int64)
# wordSize - 1 and the four field sizes minus one: the 21 header bits after ``num``.
_HEADER_TAIL = (WORD_SIZE - 1) << 16 | sum((s - 1) << (4 * (3 - i)) for i, s in enumerate(RLE_SIZES))


def encode_rle_bytes(mask: np.ndarray, box: tuple[int, int, int, int] | None = None) -> bytes:
    """Encode a mask as LS brush RLE, returned as raw bytes.

    Args:
        mask: ``(H, W)`` array of any dtype, row-major pixels; nonzero means "in the
            mask" (shown by LS as value 255). ``H * W`` may be 0 (header only).
        box: ``(x0, y0, x1, y1)``, exclusive end, that holds every nonzero pixel of
            ``mask``, when the caller knows one (a selection's or an instance's box): only
            it is scanned, so the cost follows the object's size, not the image's. The
            output is the same as without it.

    Returns:
        The bitstream, ``len == total_bits // 8 + 1`` bytes (the SDK's padding).
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    n = m.size
    if 4 * n >= 1 << 32:
        raise ValueError(f"mask of {n} pixels does not fit the 32-bit value count")

    # Runs of equal pixels -> length in values (4 per pixel), value bit, field class k.
    # Values alternate from run to run (two-valued), starting with pixel 0's.
    if box is None:
        flat = m.reshape(-1)
        if flat.dtype != np.bool_:
            flat = flat != 0
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        first = bool(flat[0]) if n else False
    else:
        change, first = _changes_in_box(m, box)
    bounds = np.concatenate(([0], change, [n])) if n else np.zeros(1, np.int64)
    pixels = np.diff(bounds)
    run_len = 4 * pixels
    run_val = (np.arange(pixels.size, dtype=np.int64) + first) & 1
    run_k = _K_OF_PIXELS[np.minimum(pixels, 65)]

    # Split runs longer than 65,536 values (only possible for k == 3).
    per_run = (run_len - 1) // _MAX_CHUNK + 1
    if np.any(per_run > 1):
        last = np.cumsum(per_run) - 1
        ch_len = np.full(int(last[-1]) + 1, _MAX_CHUNK, dtype=np.int64)
        ch_len[last] = run_len - _MAX_CHUNK * (per_run - 1)
        ch_k, ch_val = np.repeat(run_k, per_run), np.repeat(run_val, per_run)
    else:
        ch_len, ch_k, ch_val = run_len, run_k, run_val

    # Each chunk as one integer code: 1 | k | len-1 | value (0 or 255), 14..27 bits;
    # the header as two more codes (32 and 21 bits) in front.
    field = _SIZES[ch_k]
    code = (((4 | ch_k) << field | (ch_len - 1)) << WORD_SIZE) | (ch_val * 255)
    codes = np.concatenate(([4 * n, _HEADER_TAIL], code)).astype(np.uint64)
    widths = np.concatenate(([32, HEADER_BITS - 32], field + 3 + WORD_SIZE))
    offsets = np.cumsum(widths) - widths
    nbytes = int(offsets[-1] + widths[-1]) // 8 + 1

    # OR the codes into big-endian 64-bit words. A code ends at bit ``end`` of its
    # word (counted from the MSB); bits past 64 spill into the next word. Codes are
    # sorted by word, so a segmented OR (reduceat) merges the ones sharing a word.
    # (numpy defines shifts by >= 64 as 0, which zeroes ``lo`` for codes that fit.)
    word = offsets >> 6
    end = (offsets & 63) + widths
    hi = (codes >> np.maximum(end - 64, 0).astype(np.uint64)) << np.maximum(64 - end, 0).astype(np.uint64)
    lo = codes << (128 - end).astype(np.uint64)
    seg = np.flatnonzero(np.diff(word, prepend=-1) != 0)
    words = np.zeros(nbytes // 8 + 2, dtype=np.uint64)
    words[word[seg]] = np.bitwise_or.reduceat(hi, seg)
    words[word[seg] + 1] |= np.bitwise_or.reduceat(lo, seg)
    return words.astype(">u8").tobytes()[:nbytes]


def _changes_in_box(m: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, bool]:
    """Raster positions ``p`` (``0 < p < H*W``) where pixel ``p`` differs from ``p - 1``, and
    pixel 0's value, for a mask that is zero outside ``box``; reads only the box."""
    height, width = m.shape
    n = height * width
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    x1, y1 = min(int(box[2]), width), min(int(box[3]), height)
    if x1 <= x0 or y1 <= y0:
        return np.zeros(0, np.int64), False
    crop = m[y0:y1, x0:x1]
    if crop.dtype != np.bool_:
        crop = crop != 0
    first = bool(crop[0, 0]) if x0 == 0 and y0 == 0 else False
    if x0 == 0 and x1 == width:  # full-width rows: one contiguous stretch of the raster
        flat = crop.reshape(-1)
        base, end = y0 * width, y1 * width
        inner = np.flatnonzero(flat[1:] != flat[:-1]) + (1 + base)
        rise = [base] if flat[0] and base > 0 else []
        fall = [end] if flat[-1] and end < n else []
        return np.concatenate((np.array(rise, np.int64), inner, np.array(fall, np.int64))), first
    # Otherwise every box row has a pixel outside the box (zero) just before and just after it
    # in the raster. Rows laid end to end, each behind a zero column, change where the raster
    # does: in column c >= 1 at box column c - 1; in the zero column, at the fall just after
    # the row before (pixel x1 of that row). Positions come out in raster order.
    rows_n, cols_n = crop.shape
    padded = np.zeros((rows_n, cols_n + 1), dtype=bool)
    padded[:, 1:] = crop
    flat = padded.reshape(-1)
    q = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    row, col = np.divmod(q, cols_n + 1)
    change = np.where(col > 0, (row + y0) * width + (col - 1 + x0), (row + y0 - 1) * width + x1)
    last = (y1 - 1) * width + x1
    if crop[-1, -1] and last < n:
        change = np.append(change, last)
    return (change[1:] if change.size and change[0] == 0 else change), first


def encode_rle(mask: np.ndarray, box: tuple[int, int, int, int] | None = None) -> list[int]:
    """Encode an ``(H, W)`` mask (bool, uint8 0/255 or any dtype: nonzero -> 255)
    as LS brush RLE, row-major. Returns the ints 0-255 of ``value.rle``; equal to
    ``label_studio_sdk.converter.brush.mask2rle((mask != 0).astype(np.uint8) * 255)``.
    ``box``: see ``encode_rle_bytes``.
    """
    return list(encode_rle_bytes(mask, box))


def decode_rle(rle: Sequence[int] | bytes | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode LS brush RLE into an ``(height, width)`` bool mask.

    Accepts any word size (<= 32 bits) and field sizes the header declares, repeat
    and literal chunks (as the LS frontend writes them). A pixel is in the mask when
    its alpha value (4th of its RGBA values, as the SDK reads it) is nonzero.

    Raises:
        ValueError: values outside 0-255, a stream that ends early, chunks that
            overrun ``num``, or ``num != height * width * 4``.
    """
    data = np.frombuffer(rle, dtype=np.uint8) if isinstance(rle, (bytes, bytearray)) else np.asarray(rle)
    if data.ndim != 1 or (data.size and (data.dtype.kind not in "iu" or data.min() < 0 or data.max() > 255)):
        raise ValueError("rle must be a flat sequence of ints 0-255")
    nbits = 8 * data.size
    if nbits < HEADER_BITS:
        raise ValueError(f"rle stream of {data.size} bytes is shorter than the 53-bit header")
    buf = data.astype(np.uint8).tobytes() + bytes(8)
    # wins[b] = the 64 bits starting at byte b, as a Python int (fast field reads).
    wins = np.ndarray((data.size,), dtype=">u8", buffer=buf, strides=(1,)).tolist()

    def read(pos: int, w: int) -> int:
        if pos + w > nbits:
            raise ValueError(f"rle stream ends early (needs bit {pos + w}, has {nbits})")
        return (wins[pos >> 3] >> (64 - (pos & 7) - w)) & ((1 << w) - 1)

    num = read(0, 32)
    if num != 4 * height * width:
        raise ValueError(f"rle holds {num} values, expected {4 * height * width} for {height}x{width} RGBA")
    word = read(32, 5) + 1
    sizes = [read(37 + 4 * i, 4) + 1 for i in range(4)]
    vals: list[int] = []
    lens: list[int] = []
    pos, i = HEADER_BITS, 0
    while i < num:
        head = read(pos, 3)
        w = sizes[head & 3]
        n = read(pos + 3, w) + 1
        pos += 3 + w
        if head >> 2:
            vals.append(read(pos, word))
            lens.append(n)
            pos += word
        else:
            if pos + n * word > nbits:
                raise ValueError(f"rle stream ends early (literal block past bit {nbits})")
            vals.extend(read(pos + word * t, word) for t in range(n))
            lens.extend([1] * n)
            pos += n * word
        i += n
    if i != num:
        raise ValueError(f"rle chunks cover {i} values, header says {num}")
    nonzero = np.repeat(np.asarray(vals, dtype=np.int64) != 0, lens)
    return nonzero[3::4].reshape(height, width)
