"""PNG images drawn with numpy alone: an RGB canvas with anti-aliased lines, markers, filled
rectangles and text (the built-in 5x7 font, `temper.report.font`), encoded by zlib + struct.

    canvas = Canvas(640, 360)
    canvas.line([(10, 10), (200, 120)], colour=(31, 119, 180), width=2)
    canvas.text(20, 300, "loss", scale=2)
    Path("plot.png").write_bytes(canvas.png())

Coordinates are output pixels as floats, x right and y down, (0, 0) the top-left corner of the
top-left pixel. Everything is drawn on a grid `SUPERSAMPLE` times finer and averaged down when the
PNG is encoded: that average is the anti-aliasing (a pixel half covered by a line gets half its
colour). A shape that covers whole pixels therefore leaves exactly its colour there.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np

from temper.report import font

SUPERSAMPLE = 3
Colour = tuple[int, int, int]
WHITE: Colour = (255, 255, 255)
BLACK: Colour = (0, 0, 0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Canvas:
    """An RGB image of `width` x `height` pixels on a `SUPERSAMPLE`-times finer grid."""

    def __init__(self, width: int, height: int, background: Colour = WHITE) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"a canvas needs at least one pixel, got {width}x{height}")
        self.width, self.height = int(width), int(height)
        s = SUPERSAMPLE
        self.fine = np.empty((self.height * s, self.width * s, 3), dtype=np.uint8)
        self.fine[...] = np.asarray(background, dtype=np.uint8)

    # ------------------------------------------------------------------ shapes

    def rect(self, x0: float, y0: float, x1: float, y1: float, colour: Colour) -> None:
        """Fill the rectangle [x0, x1) x [y0, y1) (corners in either order)."""
        s = SUPERSAMPLE
        xa, xb = sorted((x0, x1))
        ya, yb = sorted((y0, y1))
        c0, c1 = max(0, round(xa * s)), min(self.fine.shape[1], round(xb * s))
        r0, r1 = max(0, round(ya * s)), min(self.fine.shape[0], round(yb * s))
        if c1 > c0 and r1 > r0:
            self.fine[r0:r1, c0:c1] = colour

    def line(self, points: Sequence[tuple[float, float]], colour: Colour, width: float = 1.0) -> None:
        """A polyline through `points`, `width` pixels thick, with round joins and ends."""
        pts = [(float(x), float(y)) for x, y in points]
        if len(pts) == 1:
            self.circle(pts[0][0], pts[0][1], width / 2, colour)
        for a, b in zip(pts, pts[1:]):
            self._segment(a, b, colour, width / 2)

    def _segment(self, a: tuple[float, float], b: tuple[float, float], colour: Colour, radius: float) -> None:
        s = SUPERSAMPLE
        ax, ay, bx, by, r = a[0] * s, a[1] * s, b[0] * s, b[1] * s, max(radius * s, 0.5)
        c0 = max(0, int(np.floor(min(ax, bx) - r)))
        c1 = min(self.fine.shape[1], int(np.ceil(max(ax, bx) + r)) + 1)
        r0 = max(0, int(np.floor(min(ay, by) - r)))
        r1 = min(self.fine.shape[0], int(np.ceil(max(ay, by) + r)) + 1)
        if c1 <= c0 or r1 <= r0:
            return
        px = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5  # fine pixel centres
        py = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        t = np.clip(((px - ax) * dx + (py - ay) * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0
        dist2 = (px - (ax + t * dx)) ** 2 + (py - (ay + t * dy)) ** 2
        self.fine[r0:r1, c0:c1][dist2 <= r * r] = colour

    def circle(self, cx: float, cy: float, radius: float, colour: Colour) -> None:
        """A filled disc."""
        self._segment((cx, cy), (cx, cy), colour, radius)

    def marker(self, x: float, y: float, colour: Colour, size: float = 6.0, shape: str = "circle") -> None:
        """A filled marker `size` pixels across centred on (x, y): circle, square or diamond."""
        h = size / 2
        if shape == "circle":
            self.circle(x, y, h, colour)
        elif shape == "square":
            self.rect(x - h, y - h, x + h, y + h, colour)
        elif shape == "diamond":
            for k in range(int(np.ceil(h * SUPERSAMPLE)) + 1):  # horizontal strips, narrowing to the tips
                dy = k / SUPERSAMPLE
                w = h - dy
                self.rect(x - w, y - dy - 1 / SUPERSAMPLE, x + w, y - dy, colour)
                self.rect(x - w, y + dy, x + w, y + dy + 1 / SUPERSAMPLE, colour)
        else:
            raise ValueError(f"marker shape must be circle, square or diamond, got {shape!r}")

    # ------------------------------------------------------------------ text

    @staticmethod
    def text_size(text: str, scale: int = 1) -> tuple[int, int]:
        """(width, height) in pixels of one line of `text` (the last column of spacing excluded)."""
        if not text:
            return 0, font.CELL_H * scale
        return (font.CELL_W * len(text) - 1) * scale, font.CELL_H * scale

    def text(self, x: float, y: float, text: str, colour: Colour = BLACK, scale: int = 1, anchor: str = "left",
             vertical: bool = False) -> None:
        """One line of text whose box's top-left corner is (x, y) (`anchor` "centre" or "right": x is the
        box's middle or right edge). Each font pixel is a `scale` x `scale` square. `vertical`: rotated a
        quarter turn anticlockwise (read bottom to top), (x, y) then the box's top-left as drawn."""
        mask = font.text_mask(text)
        if vertical:
            mask = np.rot90(mask)
        if anchor in ("centre", "right"):
            along = mask.shape[0 if vertical else 1] * scale
            shift = along / 2 if anchor == "centre" else along
            if vertical:
                y -= shift
            else:
                x -= shift
        elif anchor != "left":
            raise ValueError(f"anchor must be left, centre or right, got {anchor!r}")
        s = SUPERSAMPLE
        fine = np.repeat(np.repeat(mask, scale * s, axis=0), scale * s, axis=1)
        c0, r0 = round(x * s), round(y * s)
        # clip to the canvas
        top, left = max(0, -r0), max(0, -c0)
        bottom = min(fine.shape[0], self.fine.shape[0] - r0)
        right = min(fine.shape[1], self.fine.shape[1] - c0)
        if bottom <= top or right <= left:
            return
        region = self.fine[r0 + top:r0 + bottom, c0 + left:c0 + right]
        region[fine[top:bottom, left:right]] = colour

    # ------------------------------------------------------------------ output

    def pixels(self) -> np.ndarray:
        """The (height, width, 3) uint8 image: each pixel the mean of its fine samples, rounded half up
        (integer sums: a pixel wholly covered by one colour keeps it exactly)."""
        s = SUPERSAMPLE
        total = np.zeros((self.height, self.width, 3), dtype=np.uint16)  # at most 255 * s * s
        for dy in range(s):
            for dx in range(s):
                total += self.fine[dy::s, dx::s]
        return ((total + (s * s) // 2) // (s * s)).astype(np.uint8)

    def png(self) -> bytes:
        return encode_png(self.pixels())


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of a (height, width, 3) uint8 array (each row filtered with `Sub`, which
    shrinks flat backgrounds; compressed at zlib level 9)."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a (height, width, 3) uint8 array, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, width * 3).astype(np.int16)
    sub = rows.copy()
    sub[:, 3:] -= rows[:, :-3]  # Sub filter: each byte minus the byte of the pixel to its left, mod 256
    raw = np.empty((height, width * 3 + 1), dtype=np.uint8)
    raw[:, 0] = 1  # filter type 1 (Sub) on every row
    raw[:, 1:] = (sub % 256).astype(np.uint8)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return (PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
            + _chunk(b"IEND", b""))


def decode_png(data: bytes) -> np.ndarray:
    """The pixels of an 8-bit RGB, non-interlaced PNG (the kind `encode_png` writes, with any of
    the five row filters): a (height, width, 3) uint8 array. Checks every chunk's CRC."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file (bad signature)")
    pos, idat, header = len(PNG_SIGNATURE), b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"PNG chunk {kind!r}: CRC mismatch")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or header[2:] != (8, 2, 0, 0, 0):
        raise ValueError(f"only 8-bit RGB non-interlaced PNGs are read, got IHDR {header}")
    width, height = header[:2]
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, width * 3 + 1)
    out = np.zeros((height, width * 3), dtype=np.int32)
    for y in range(height):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        prev = out[y - 1] if y else np.zeros(width * 3, dtype=np.int32)
        if f == 0:
            cur = line
        elif f == 1:  # Sub: a running sum along the row, per channel
            cur = (line.reshape(width, 3).cumsum(axis=0) % 256).reshape(-1)
        elif f == 2:
            cur = (line + prev) % 256
        else:  # Average and Paeth depend on the left neighbour as decoded: byte by byte
            cur = np.zeros(width * 3, dtype=np.int32)
            for i in range(width * 3):
                a = cur[i - 3] if i >= 3 else 0
                b, c = prev[i], (prev[i - 3] if i >= 3 else 0)
                if f == 3:
                    pred = (a + b) // 2
                elif f == 4:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                else:
                    raise ValueError(f"unknown PNG filter type {f}")
                cur[i] = (line[i] + pred) % 256
        out[y] = cur
    return out.reshape(height, width, 3).astype(np.uint8)
