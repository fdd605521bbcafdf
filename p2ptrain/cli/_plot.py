"""A dependency-free PNG of a run: the loss curve and a per-stage pipeline timeline.

Drawn into an RGB byte raster and written with zlib (PNG, RFC 2083), so the demo needs
no plotting library on a robot. The timeline shows which micro-batch ran where and when:
one lane per stage, forward ops in a light shade and backward ops in a dark shade of
the micro-batch's colour — a full pipeline has few gaps.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

__all__ = ["write_run_png"]

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


class _Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def rect(self, x0: float, y0: float, x1: float, y1: float, rgb: tuple[int, int, int]) -> None:
        xa, xb = max(0, int(x0)), min(self.w, max(int(x0) + 1, int(x1)))
        ya, yb = max(0, int(y0)), min(self.h, int(y1))
        row = bytes(rgb) * (xb - xa)
        for y in range(ya, yb):
            i = (y * self.w + xa) * 3
            self.px[i : i + len(row)] = row

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        head = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_run_png(path: str | Path, losses: Sequence[float], timelines: Sequence[Sequence[tuple[int, int, float, float]]] = (),
                  events: Sequence[int] = ()) -> None:
    """Write the loss curve (top) and, when given, one timeline lane per member (bottom).

    Args:
        path: the PNG file to write.
        losses: loss per step.
        timelines: per member (ring order), ops as (kind: 0 forward / 1 backward / 2
            optimizer, micro-batch, start seconds, end seconds) on a clock shared by
            the members; a member the plan left out has an empty lane.
        events: steps where the ring changed (a member lost, a recovery): a red line
            across the loss curve. A NaN loss (a step whose loss was lost with a
            member) leaves a gap.
    """
    w, top, lane = 900, 220, 28
    h = top + 20 + max(1, len(timelines)) * (lane + 6) + 10
    c = _Canvas(w, h)
    c.rect(40, 10, 41, top, (0, 0, 0))
    c.rect(40, top, w - 10, top + 1, (0, 0, 0))
    n = max(1, len(losses) - 1)
    for step in events:
        x = 41 + (w - 52) * min(step, n) / n
        c.rect(x, 10, x + 2, top, (214, 39, 40))
    known = [v for v in losses if math.isfinite(v)]
    if known:
        lo, hi = min(known), max(known)
        span = (hi - lo) or 1.0
        prev = None
        for i, v in enumerate(losses):
            if not math.isfinite(v):
                prev = None
                continue
            x = 41 + (w - 52) * i / n
            y = 12 + (top - 16) * (1 - (v - lo) / span)
            if prev is not None:  # a polyline of small squares: enough for a glance
                steps = int(max(abs(x - prev[0]), abs(y - prev[1]))) + 1
                for k in range(steps + 1):
                    t = k / steps
                    c.rect(prev[0] + (x - prev[0]) * t, prev[1] + (y - prev[1]) * t,
                           prev[0] + (x - prev[0]) * t + 2, prev[1] + (y - prev[1]) * t + 2, (31, 119, 180))
            prev = (x, y)
    ops = [op for tl in timelines for op in tl]
    if ops:
        t0 = min(o[2] for o in ops)
        t1 = max(o[3] for o in ops)
        scale = (w - 52) / ((t1 - t0) or 1.0)
        for s, tl in enumerate(timelines):
            y = top + 20 + s * (lane + 6)
            c.rect(40, y, w - 10, y + lane, (235, 235, 235))
            for kind, micro, a, b in tl:
                r, g, bl = _PALETTE[int(micro) % len(_PALETTE)] if kind != 2 else (60, 60, 60)
                if kind == 0:  # forward: lighter
                    r, g, bl = (r + 255) // 2, (g + 255) // 2, (bl + 255) // 2
                c.rect(41 + (a - t0) * scale, y + 2, 41 + (b - t0) * scale, y + lane - 2, (r, g, bl))
    Path(path).write_bytes(c.png())
