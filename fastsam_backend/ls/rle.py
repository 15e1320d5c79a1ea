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

``encode_rle_crops`` encodes several masks of one image given as box + crop (no image-sized
array): an answer's regions in one pass, the same bytes as ``encode_rle_bytes`` of each mask.
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
    if box is not None:
        height, width = m.shape
        x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
        x1, y1 = min(int(box[2]), width), min(int(box[3]), height)
        if x1 <= x0 or y1 <= y0:
            return _encode_one(n, np.zeros(0, np.int64), False)
        return _encode_one(n, *_crop_changes(m[y0:y1, x0:x1], (x0, y0, x1, y1), m.shape))
    flat = m.reshape(-1)
    if flat.dtype != np.bool_:
        flat = flat != 0
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    return _encode_one(n, change, bool(flat[0]) if n else False)


def encode_rle_crops(image_size: tuple[int, int], boxes: Sequence[Sequence[int]] | np.ndarray,
                     crops: Sequence[np.ndarray]) -> list[bytes]:
    """``encode_rle_bytes`` of several ``image_size`` masks, each given as its box and crop only.

    Mask ``k`` is ``crops[k]`` (any dtype, nonzero = in the mask) inside ``boxes[k]``
    (``x0, y0, x1, y1``, exclusive end, within the image; the crop has the box's shape) and
    zero outside it: no ``(H, W)`` array is built. Several masks are encoded together, each
    numpy call made once for all of them (an exemplar answer has 20 small masks: per mask, the
    calls' fixed cost was most of the encoding). Returns one bitstream per mask, in order.

    Raises:
        ValueError: a box outside the image, or a crop whose shape is not its box's.
    """
    height, width = (int(v) for v in image_size)
    n = height * width
    if 4 * n >= 1 << 32:
        raise ValueError(f"masks of {n} pixels do not fit the 32-bit value count")
    box_array = np.asarray(boxes, dtype=np.int64).reshape(len(crops), 4)
    bl = box_array.tolist()
    for k, ((x0, y0, x1, y1), crop) in enumerate(zip(bl, crops)):
        if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
            raise ValueError(f"box {k} {(x0, y0, x1, y1)} is not within the {width}x{height} image")
        if crop.shape != (y1 - y0, x1 - x0):
            raise ValueError(f"crop {k} has shape {crop.shape}, its box {(x0, y0, x1, y1)} needs "
                             f"{(y1 - y0, x1 - x0)}")
    if not crops:
        return []
    if len(crops) == 1 or n == 0:  # one mask: the leaner single-stream path (a click's answer)
        return [_encode_one(n, *_crop_changes(c, tuple(b), (height, width))) if c.size
                else _encode_one(n, np.zeros(0, np.int64), False) for b, c in zip(bl, crops)]
    return _encode_many(n, width, box_array, crops)


def _crop_changes(crop: np.ndarray, box: tuple[int, int, int, int],
                  shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """Raster positions ``p`` (``0 < p < H*W``) where pixel ``p`` differs from ``p - 1``, and
    pixel 0's value, for a ``shape`` mask that is ``crop`` inside ``box`` (within the image,
    not empty) and zero outside it."""
    height, width = shape
    n = height * width
    x0, y0, x1, y1 = box
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


def _encode_one(n: int, change: np.ndarray, first: bool) -> bytes:
    """The bitstream of one mask of ``n`` pixels from its changes (``change``: the sorted raster
    positions ``0 < p < n`` where pixel ``p`` differs from ``p - 1``; ``first``: pixel 0)."""
    # Runs of equal pixels -> length in values (4 per pixel), value bit, field class k.
    # Values alternate from run to run (two-valued), starting with pixel 0's.
    bounds = np.concatenate(([0], change, [n])) if n else np.zeros(1, np.int64)
    pixels = np.diff(bounds)
    run_val = (np.arange(pixels.size, dtype=np.int64) + first) & 1
    codes, widths = _chunk_codes(pixels, run_val)
    codes = np.concatenate(([_header(n)], codes)).astype(np.uint64)
    widths = np.concatenate(([HEADER_BITS], widths))
    offsets = np.cumsum(widths) - widths
    nbytes = int(offsets[-1] + widths[-1]) // 8 + 1
    return _or_codes(codes, widths, offsets, nbytes // 8 + 2).astype(">u8").tobytes()[:nbytes]


def _encode_many(n: int, width: int, boxes: np.ndarray, crops: Sequence[np.ndarray]) -> list[bytes]:
    """``encode_rle_crops`` for ``n > 0`` pixels: the masks' runs in one array, their streams
    packed side by side (each from a word of its own) in one pass."""
    # Every crop row behind a zero column, each crop followed by one zero, all end to end: where
    # neighbours differ is a change of the raster (as in ``_crop_changes``), the zero column's
    # own changes being falls just past the row above. The value there is the new run's.
    count = len(crops)
    x0, y0, x1, y1 = boxes.T
    stride = x1 - x0 + 1
    size = (y1 - y0) * stride + 1
    start = np.cumsum(size) - size
    buf = np.zeros(int(start[-1] + size[-1]), bool)
    for crop, s, st in zip(crops, start.tolist(), stride.tolist()):
        if crop.size:
            rows = buf[s:s + crop.shape[0] * st].reshape(crop.shape[0], st)
            rows[:, 1:] = crop if crop.dtype == np.bool_ else crop != 0
    q = np.flatnonzero(buf[1:] != buf[:-1]) + 1
    # q is sorted, and no change is at a crop's first (zero) element: count them per crop
    owner = np.repeat(np.arange(count), np.diff(np.searchsorted(q, start), append=q.size))
    row, col = np.divmod(q - start[owner], stride[owner])
    # column c >= 1 of a row is pixel x0 + c - 1 of its image row; column 0, pixel x1 of the row above
    pos = row * width + np.where(col > 0, col + (y0 * width + x0 - 1)[owner], ((y0 - 1) * width + x1)[owner])
    value = buf[q]
    if np.any(stride == width + 1):  # full-width rows: a fall at a row's end and the rise of the next
        twin = (pos[1:] == pos[:-1]) & (owner[1:] == owner[:-1])  # start on one pixel and cancel
        keep = np.ones(pos.size, bool)
        keep[1:] &= ~twin
        keep[:-1] &= ~twin
        pos, value, owner = pos[keep], value[keep], owner[keep]

    # Bounds of the runs, all masks in one array: n (a previous stream's end), then per mask
    # 0, its changes, n. Differences: a run's length in pixels; -n where a stream starts (its
    # header's slot); 0 for the empty runs a rise at pixel 0 or a fall at pixel n leaves (dropped).
    per_mask = np.bincount(owner, minlength=count)
    tail = np.cumsum(per_mask) + 2 * np.arange(count) + 2
    bounds = np.zeros(pos.size + 2 * count + 1, np.int64)
    bounds[0] = n
    bounds[tail] = n
    at = np.arange(pos.size) + 2 * owner + 2
    bounds[at] = pos
    values = np.zeros(bounds.size, np.int64)  # the value of the run from each bound on
    values[at] = value
    pixels = np.diff(bounds)
    kept = pixels != 0
    pixels, values = pixels[kept], values[:-1][kept]
    head = pixels < 0
    codes, widths = _chunk_codes(np.where(head, 1, pixels), values, head, _header(n))

    # Stream k starts at a word of its own: its codes move by its start's distance to that word.
    heads = np.flatnonzero(widths == HEADER_BITS)
    offsets = np.cumsum(widths) - widths
    stream_at = offsets[heads]
    nbytes = np.diff(np.append(stream_at, offsets[-1] + widths[-1])) // 8 + 1
    nwords = nbytes // 8 + 2  # one spare word: the spill of the stream's last code
    base = np.cumsum(nwords) - nwords
    offsets += np.repeat(64 * base - stream_at, np.diff(np.append(heads, offsets.size)))
    raw = _or_codes(codes.astype(np.uint64), widths, offsets, int(base[-1] + nwords[-1])).astype(">u8").tobytes()
    return [raw[8 * s:8 * s + size] for s, size in zip(base.tolist(), nbytes.tolist())]


def _header(n: int) -> int:
    """The 53 header bits of an ``n``-pixel mask as one code: ``num`` = 4n values, then the rest."""
    return (4 * n) << (HEADER_BITS - 32) | _HEADER_TAIL


def _chunk_codes(pixels: np.ndarray, run_val: np.ndarray, head: np.ndarray | None = None,
                 header: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, widths)``: each run (``pixels`` long, value bit ``run_val``) as its chunks' codes,
    ``1 | k | len-1 | value (0 or 255)``, 14..27 bits; runs longer than 65,536 values (only
    possible for k == 3) become several chunks. Where ``head`` is set, the ``header`` code instead."""
    run_len = 4 * pixels
    run_k = _K_OF_PIXELS[np.minimum(pixels, 65)]
    per_run = (run_len - 1) // _MAX_CHUNK + 1
    if per_run.size and per_run.max() > 1:
        last = np.cumsum(per_run) - 1
        ch_len = np.full(int(last[-1]) + 1, _MAX_CHUNK, dtype=np.int64)
        ch_len[last] = run_len - _MAX_CHUNK * (per_run - 1)
        ch_k, ch_val = np.repeat(run_k, per_run), np.repeat(run_val, per_run)
        head = None if head is None else np.repeat(head, per_run)
    else:
        ch_len, ch_k, ch_val = run_len, run_k, run_val
    field = _SIZES[ch_k]
    codes = (((4 | ch_k) << field | (ch_len - 1)) << WORD_SIZE) | (ch_val * 255)
    widths = field + 3 + WORD_SIZE
    if head is not None:
        codes[head], widths[head] = header, HEADER_BITS
    return codes, widths


def _or_codes(codes: np.ndarray, widths: np.ndarray, offsets: np.ndarray, nwords: int) -> np.ndarray:
    """``nwords`` 64-bit words holding each code (uint64, ``widths`` <= 64 bits) at its bit
    offset, counted from the MSB of word 0; offsets ascending, codes never overlapping."""
    # OR the codes into big-endian 64-bit words. Each code, moved to the top of a 64-bit
    # value, starts at bit ``at`` of its word (counted from the MSB): its first 64 - at bits
    # are in that word, the rest spill into the next. Codes are sorted by word, so a
    # segmented OR (reduceat) merges the ones sharing a word. (numpy defines shifts by >= 64
    # as 0, which zeroes ``lo`` for codes starting at bit 0.)
    word = offsets >> 6
    top = codes << (64 - widths).astype(np.uint64)
    at = (offsets & 63).astype(np.uint64)
    hi, lo = top >> at, top << (64 - at)
    seg = np.flatnonzero(np.diff(word, prepend=-1) != 0)
    words = np.zeros(nwords, dtype=np.uint64)
    words[word[seg]] = np.bitwise_or.reduceat(hi, seg)
    words[word[seg] + 1] |= np.bitwise_or.reduceat(lo, seg)
    return words


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
