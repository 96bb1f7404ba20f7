"""Just enough of PNG to count a colour's pixels in a browser's screenshot (8-bit RGB/RGBA, not
interlaced, as Chromium writes them), so a test can tell that a chart was actually painted."""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {2: 3, 6: 4}  # colour type -> bytes per pixel (RGB, RGBA)


def rgb_pixels(png: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(width, height, pixels row by row)."""
    if not png.startswith(SIGNATURE):
        raise ValueError("not a PNG")
    header, compressed = _chunks(png)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in CHANNELS or interlace != 0:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}, interlace {interlace}")
    bpp = CHANNELS[colour]
    raw = zlib.decompress(compressed)
    stride = width * bpp
    pixels: list[tuple[int, int, int]] = []
    previous = bytearray(stride)
    for row_index in range(height):
        start = row_index * (stride + 1)
        row = _unfilter(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous, bpp)
        pixels += [(row[i], row[i + 1], row[i + 2]) for i in range(0, stride, bpp)]
        previous = row
    return width, height, pixels


def _chunks(png: bytes) -> tuple[bytes, bytes]:
    offset, header, data = len(SIGNATURE), b"", bytearray()
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind = png[offset + 4 : offset + 8]
        body = png[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            data += body
        offset += 12 + length
    return header, bytes(data)


def _unfilter(kind: int, row: bytearray, previous: bytearray, bpp: int) -> bytearray:
    for i in range(len(row)):
        left = row[i - bpp] if i >= bpp else 0
        up = previous[i]
        up_left = previous[i - bpp] if i >= bpp else 0
        if kind == 1:
            row[i] = (row[i] + left) & 0xFF
        elif kind == 2:
            row[i] = (row[i] + up) & 0xFF
        elif kind == 3:
            row[i] = (row[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            row[i] = (row[i] + _paeth(left, up, up_left)) & 0xFF
    return row


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def count_near(pixels: list[tuple[int, int, int]], colour: tuple[int, int, int], tolerance: int = 24) -> int:
    return sum(1 for p in pixels if all(abs(p[i] - colour[i]) <= tolerance for i in range(3)))
