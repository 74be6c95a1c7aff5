"""A small PNG reader and writer built on ``zlib`` and NumPy (no Pillow).

The reader covers the non-interlaced PNGs met in few-shot data sets: the
Omniglot images are 105×105 1-bit grayscale; it also reads 2/4/8/16-bit
grayscale, grayscale + alpha, RGB and RGBA (8/16 bit), and palette images
(1/2/4/8 bit, with ``tRNS`` transparency). All five PNG filter types are
undone, multiple ``IDAT`` chunks are joined, and every chunk's CRC is checked.
Adam7-interlaced images are refused with a clear error.

The writer produces the same formats except palette images, with a chosen
filter type per row; it exists so that tests can generate data sets in the
published layout without any download.

Hostile files cost nothing: the declared size is checked against ``max_pixels``
(by default Pillow's decompression-bomb limit, :data:`MAX_PIXELS`) before any
image data is inflated, and the data are inflated at most to the bytes that size
needs (``zlib.decompressobj(...).decompress(data, max_length)``), so neither a
small file declaring 20000×20000 nor a 1 MiB file whose data inflate to 1 GiB
allocates more than the declared image. (Pillow itself was not adopted: it reads
16-bit RGB as 8-bit and rescales 2- and 4-bit grayscale, which would change what
:func:`read_png` returns, and cannot write 2/4-bit images or chosen row filters.)

Sample values are returned unscaled (``uint8``, or ``uint16`` for 16-bit
images; a 1-bit image holds 0 and 1). :func:`read_png_gray` converts any
supported image to float intensities in ``[0, 1]`` (1 = white).
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np
from ..errors import PngError

__all__ = ["PngError", "read_png", "read_png_gray", "write_png", "PNG_SIGNATURE", "MAX_PIXELS"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: about 0.25 GiB of 24-bit pixels

PathOrBytes = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

# colour type -> (channels, allowed bit depths, name)
_COLOR_TYPES = {
    0: (1, (1, 2, 4, 8, 16), "grayscale"),
    2: (3, (8, 16), "RGB"),
    3: (1, (1, 2, 4, 8), "palette"),
    4: (2, (8, 16), "grayscale+alpha"),
    6: (4, (8, 16), "RGBA"),
}


def _load_bytes(source: PathOrBytes) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"PNG file not found: {path}") from None


def _paeth_predictor(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    if pb <= pc:
        return b
    return c


def _unfilter(raw: bytes, height: int, row_bytes: int, bpp: int, name: str) -> np.ndarray:
    """Undo the per-row PNG filters; returns ``(height, row_bytes)`` uint8."""
    stride = row_bytes + 1
    if len(raw) < height * stride:
        raise PngError(
            f"{name}: image data is truncated: {len(raw)} bytes after decompression, "
            f"{height * stride} expected for {height} rows of {row_bytes} bytes"
        )
    data = np.frombuffer(raw, dtype=np.uint8, count=height * stride).reshape(height, stride)
    types = data[:, 0]
    bad = np.flatnonzero(types > 4)
    if bad.size:
        raise PngError(f"{name}: row {int(bad[0])} has unknown filter type {int(types[bad[0]])} (0-4 are defined)")
    filt = data[:, 1:]
    if not types.any():  # fast path: no filtering at all
        return filt.copy()
    out = np.empty((height, row_bytes), dtype=np.uint8)
    prev = np.zeros(row_bytes, dtype=np.uint8)
    for y in range(height):
        kind = int(types[y])
        row = filt[y]
        if kind == 0:
            out[y] = row
        elif kind == 1:  # Sub: running sum along each byte lane, modulo 256
            out[y] = np.cumsum(row.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up
            out[y] = row + prev
        else:  # Average or Paeth: sequential in the row
            cur = bytearray(row.tobytes())
            up = prev.tobytes()
            if kind == 3:
                for i in range(row_bytes):
                    left = cur[i - bpp] if i >= bpp else 0
                    cur[i] = (cur[i] + ((left + up[i]) >> 1)) & 0xFF
            else:
                for i in range(row_bytes):
                    if i >= bpp:
                        pred = _paeth_predictor(cur[i - bpp], up[i], up[i - bpp])
                    else:
                        pred = up[i]
                    cur[i] = (cur[i] + pred) & 0xFF
            out[y] = np.frombuffer(bytes(cur), dtype=np.uint8)
        prev = out[y]
    return out


def _decode(data: bytes, name: str, max_pixels: int | None = MAX_PIXELS) -> tuple[np.ndarray, int, int]:
    """Decode PNG bytes into ``(samples, bit_depth, color_type)``; palette images are expanded."""
    if data[:8] != PNG_SIGNATURE:
        raise PngError(f"{name}: not a PNG file (the 8-byte PNG signature is missing)")
    pos = 8
    header = None
    idat: list[bytes] = []
    palette = None
    transparency = None
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc_bytes = data[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc_bytes) != 4:
            raise PngError(f"{name}: chunk {ctype!r} is truncated")
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != struct.unpack(">I", crc_bytes)[0]:
            raise PngError(f"{name}: CRC mismatch in chunk {ctype.decode('latin-1')!r} (file is corrupt)")
        pos += 12 + length
        if ctype == b"IHDR":
            if length != 13:
                raise PngError(f"{name}: IHDR chunk has length {length}, 13 expected")
            header = struct.unpack(">IIBBBBB", body)
        elif ctype == b"PLTE":
            if length % 3:
                raise PngError(f"{name}: PLTE chunk length {length} is not a multiple of 3")
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif ctype == b"tRNS":
            transparency = body
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
        elif not (ctype[0] & 0x20):  # an unknown critical chunk
            raise PngError(f"{name}: unsupported critical chunk {ctype.decode('latin-1')!r}")
    if header is None:
        raise PngError(f"{name}: no IHDR chunk")
    width, height, depth, color, compression, filter_method, interlace = header
    if color not in _COLOR_TYPES:
        raise PngError(f"{name}: unknown colour type {color} (0, 2, 3, 4 and 6 are defined)")
    channels, depths, color_name = _COLOR_TYPES[color]
    if depth not in depths:
        raise PngError(f"{name}: bit depth {depth} is not valid for {color_name} images (allowed: {depths})")
    if compression != 0 or filter_method != 0:
        raise PngError(f"{name}: unknown compression method {compression} or filter method {filter_method}")
    if interlace != 0:
        raise PngError(
            f"{name}: Adam7-interlaced PNGs are not supported by this reader; re-save the image without interlacing"
        )
    if width == 0 or height == 0:
        raise PngError(f"{name}: image has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise PngError(
            f"{name}: refused: it declares {width}x{height} = {width * height:,} pixels, more than max_pixels="
            f"{max_pixels:,} (a decompression bomb?); pass max_pixels=None to read it anyway"
        )
    if not idat:
        raise PngError(f"{name}: no IDAT (image data) chunk")
    bits_per_pixel = channels * depth
    row_bytes = (width * bits_per_pixel + 7) // 8
    needed = height * (row_bytes + 1)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(b"".join(idat), needed)
        more = inflater.decompress(inflater.unconsumed_tail, 1) if inflater.unconsumed_tail else b""
    except zlib.error as exc:
        raise PngError(f"{name}: image data does not decompress: {exc}") from None
    if more:
        raise PngError(
            f"{name}: refused: its image data inflate to more than the {needed:,} bytes its declared "
            f"{width}x{height} size needs (a decompression bomb or a corrupt file)"
        )
    bpp = max(1, bits_per_pixel // 8)
    rows = _unfilter(raw, height, row_bytes, bpp, name)

    if depth < 8:
        bits = np.unpackbits(rows, axis=1)  # most significant bit first, as PNG packs pixels
        per_row = row_bytes * 8 // depth
        groups = bits.reshape(height, per_row, depth).astype(np.uint8)
        weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint8)
        samples = (groups * weights).sum(axis=2, dtype=np.uint8)[:, :width]
    elif depth == 8:
        samples = rows.reshape(height, width, channels)
    else:
        samples = rows.view(">u2").reshape(height, width, channels).astype(np.uint16)

    if color == 3:
        if palette is None:
            raise PngError(f"{name}: palette image without a PLTE chunk")
        index = samples.reshape(height, width)
        if int(index.max()) >= len(palette):
            raise PngError(f"{name}: palette index {int(index.max())} out of range ({len(palette)} entries)")
        if transparency is not None:
            alpha = np.full(len(palette), 255, dtype=np.uint8)
            trns = np.frombuffer(transparency, dtype=np.uint8)[: len(palette)]
            alpha[: len(trns)] = trns
            table = np.concatenate([palette, alpha[:, None]], axis=1)
            return table[index], 8, 6
        return palette[index], 8, 2
    samples = samples.reshape(height, width, channels)
    if channels == 1:
        samples = samples[:, :, 0]
    return np.ascontiguousarray(samples), depth, color


def read_png(source: PathOrBytes, *, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Read a non-interlaced PNG file (path) or PNG bytes into a NumPy array.

    Returns unscaled samples: ``(H, W)`` for grayscale, ``(H, W, 2)`` grayscale +
    alpha, ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA; ``uint8`` (values below
    ``2**bit_depth`` for 1/2/4-bit grayscale) or ``uint16`` for 16-bit images.
    Palette images are expanded to RGB, or RGBA when they carry ``tRNS``.

    Raises:
        PngError: malformed data, a CRC mismatch, an interlaced image, more than
            ``max_pixels`` pixels declared, or image data that inflate to more
            than the declared size needs.
    """
    data, name = _load_bytes(source)
    return _decode(data, name, max_pixels)[0]


def read_png_gray(source: PathOrBytes, *, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Read a PNG as ``float32`` gray intensities in ``[0, 1]``, shape ``(H, W)`` (1 = white).

    Grayscale values are divided by ``2**bit_depth - 1``; RGB is converted with
    the ITU-R BT.601 luma weights (0.299, 0.587, 0.114); an alpha channel is
    composited over a white background.
    """
    data, name = _load_bytes(source)
    samples, depth, color = _decode(data, name, max_pixels)
    scale = float((1 << (16 if samples.dtype == np.uint16 else depth if color == 0 else 8)) - 1)
    values = samples.astype(np.float32) / scale
    if values.ndim == 2:
        return values
    channels = values.shape[2]
    alpha = None
    if channels in (2, 4):
        alpha = values[:, :, -1]
        values = values[:, :, :-1]
    if values.shape[2] == 3:
        gray = values @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        gray = values[:, :, 0]
    if alpha is not None:
        gray = gray * alpha + (1.0 - alpha)
    return np.clip(gray, 0.0, 1.0).astype(np.float32)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _filter_rows(rows: np.ndarray, bpp: int, filter_type: int | str) -> bytes:
    """Apply PNG filters (forward direction); ``filter_type`` 0-4, or "cycle" (row i uses i % 5)."""
    height, row_bytes = rows.shape
    raw = rows.astype(np.int32)
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    upleft = np.zeros_like(raw)
    upleft[:, bpp:] = up[:, :-bpp]
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    candidates = [raw, raw - left, raw - up, raw - (left + up) // 2, raw - paeth]
    if filter_type == "cycle":
        kinds = np.arange(height) % 5
    elif isinstance(filter_type, int) and 0 <= filter_type <= 4:
        kinds = np.full(height, filter_type)
    else:
        raise ValueError(
            f"filter_type={filter_type!r}: use 0 (None), 1 (Sub), 2 (Up), 3 (Average), 4 (Paeth) or 'cycle'"
        )
    stacked = np.stack(candidates)  # (5, H, row_bytes)
    chosen = stacked[kinds, np.arange(height)] & 0xFF
    out = np.concatenate([kinds[:, None], chosen], axis=1).astype(np.uint8)
    return out.tobytes()


def write_png(
    array: np.ndarray,
    path: str | os.PathLike[str] | None = None,
    *,
    bit_depth: int | None = None,
    filter_type: int | str = 0,
    compression: int = 6,
) -> bytes:
    """Encode ``array`` as a non-interlaced PNG; write it to ``path`` if given; return the bytes.

    Args:
        array: ``(H, W)`` grayscale, or ``(H, W, C)`` with C = 1 (grayscale),
            2 (grayscale + alpha), 3 (RGB) or 4 (RGBA). ``bool`` arrays become
            1-bit grayscale (True = white), ``uint8`` 8-bit, ``uint16`` 16-bit.
        bit_depth: override for grayscale ``uint8`` input: 1, 2 or 4 (values must
            fit, e.g. 0/1 for a 1-bit image, which is how Omniglot is stored).
        filter_type: PNG row filter, 0 (None) to 4 (Paeth), or ``"cycle"`` to
            use every filter on successive rows (for testing readers).
        compression: zlib level 0-9.
    """
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        channels = 1
    elif arr.ndim == 3 and arr.shape[2] in (2, 3, 4):
        channels = arr.shape[2]
    else:
        raise ValueError(f"array has shape {arr.shape}; expected (H, W) or (H, W, C) with C in 1, 2, 3, 4")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"array has shape {arr.shape}; a PNG needs at least one pixel")
    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    if arr.dtype == np.bool_:
        if channels != 1:
            raise ValueError("bool arrays must be 2-D (1-bit grayscale)")
        arr = arr.astype(np.uint8)
        depth = 1
    elif arr.dtype == np.uint8:
        depth = 8
    elif arr.dtype == np.uint16:
        depth = 16
    else:
        raise ValueError(f"array dtype {arr.dtype} is not supported: use bool, uint8 or uint16")
    if bit_depth is not None and bit_depth != depth:
        if channels != 1 or arr.dtype != np.uint8 or bit_depth not in (1, 2, 4, 8):
            raise ValueError(f"bit_depth={bit_depth} is only available for 2-D uint8/bool grayscale input (1, 2, 4, 8)")
        depth = bit_depth
    if depth < 8 and int(arr.max()) >= (1 << depth):
        raise ValueError(
            f"bit_depth={depth} holds values below {1 << depth}, but the array's maximum is {int(arr.max())}"
        )
    height, width = arr.shape[:2]
    if depth < 8:
        per_byte = 8 // depth
        padded_width = -(-width // per_byte) * per_byte
        padded = np.zeros((height, padded_width), dtype=np.uint8)
        padded[:, :width] = arr
        shifts = (depth * np.arange(per_byte - 1, -1, -1)).astype(np.uint8)
        rows = (padded.reshape(height, -1, per_byte) << shifts).sum(axis=2, dtype=np.uint8)
        bpp = 1
    elif depth == 8:
        rows = arr.reshape(height, width * channels).astype(np.uint8)
        bpp = channels
    else:
        rows = arr.astype(">u2").reshape(height, -1).view(np.uint8).reshape(height, width * channels * 2)
        bpp = 2 * channels
    body = _filter_rows(np.ascontiguousarray(rows), bpp, filter_type)
    png = (
        PNG_SIGNATURE
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(body, compression))
        + _chunk(b"IEND", b"")
    )
    if path is not None:
        Path(path).write_bytes(png)
    return png
