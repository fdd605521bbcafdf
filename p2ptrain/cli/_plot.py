"""run.png: the loss curve and the pipeline timeline of a run.

With matplotlib installed (``pip install 'p2ptrain[plot]'``) the picture has labelled
axes: loss against step with a red line where the ring changed, and below it the
pipeline timeline in milliseconds, one named lane per member, forward and backward ops
in two colours with the micro-batch number on the wide ones.

Without it (a robot need not carry a plotting library) a basic picture of the same data
is drawn into an RGB raster and written with zlib (PNG, RFC 2083): no axes or labels,
forward ops in a light and backward ops in a dark shade of the micro-batch's colour.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PLOT_HINT", "write_run_png"]

PLOT_HINT = "pip install 'p2ptrain[plot]'"
"""What gives the labelled picture (matplotlib)."""

Op = tuple[int, int, float, float]  # (kind: 0 forward / 1 backward / 2 optimizer, micro-batch, start s, end s)

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


def write_run_png(path: str | Path, losses: Sequence[float], timelines: Sequence[Sequence[Op]] = (),
                  events: Sequence[int] = (), *, members: Sequence[str] = (), first_step: int = 0, title: str = "") -> str:
    """Write the loss curve (top) and, when given, one timeline lane per member (bottom).

    Args:
        path: the PNG file to write.
        losses: loss per step, of steps ``first_step``, ``first_step + 1``, ...; a NaN
            (a step whose loss was lost with a member) leaves a gap.
        timelines: per member (ring order), ops as (kind: 0 forward / 1 backward / 2
            optimizer, micro-batch, start seconds, end seconds) on a clock shared by
            the members; a member the plan left out has an empty lane.
        events: indexes into ``losses`` where the ring changed (a member lost, a
            recovery): a red line across the loss curve.
        members: the lanes' names (member ids, ring order).
        first_step: the step of ``losses[0]`` (a resumed run starts later).
        title: the picture's title.

    Returns:
        ``"matplotlib"`` when the labelled picture was drawn, ``"basic"`` when
        matplotlib is missing and the dependency-free one was.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        _write_basic(path, losses, timelines, events)
        return "basic"
    _draw(Figure, path, losses, timelines, events, members, first_step, title)
    return "matplotlib"


_KINDS = (("forward", "#9ecae1"), ("backward", "#3182bd"), ("optimizer", "#636363"))


def _draw(figure: Any, path: str | Path, losses: Sequence[float], timelines: Sequence[Sequence[Op]], events: Sequence[int],
          members: Sequence[str], first_step: int, title: str) -> None:
    """The labelled picture, through matplotlib's object API (no pyplot: no global state, no display)."""
    from matplotlib.patches import Patch

    ops = [op for tl in timelines for op in tl]
    fig = figure(figsize=(10, 7 if ops else 4), dpi=100, layout="constrained")
    if ops:
        ax, lanes = fig.subplots(2, 1, height_ratios=[3, max(1.2, 0.45 * len(timelines))])
    else:
        ax, lanes = fig.subplots(1, 1), None
    fig.suptitle(title or "p2ptrain run")
    steps = [first_step + i for i in range(len(losses))]
    ax.plot(steps, [v if math.isfinite(v) else math.nan for v in losses], color="#1f77b4", lw=1.5, label="loss")
    for k, e in enumerate(events):
        ax.axvline(first_step + e, color="#d62728", ls="--", lw=1.2, label="ring changed" if k == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss (global-batch mean)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if lanes is not None:
        t0 = min(o[2] for o in ops)
        span_ms = max(1e-6, (max(o[3] for o in ops) - t0) * 1000)
        for lane, tl in enumerate(timelines):
            for kind, (_, colour) in enumerate(_KINDS):
                bars = [((a - t0) * 1000, (b - a) * 1000) for k, _, a, b in tl if k == kind]
                lanes.broken_barh(bars, (lane - 0.4, 0.8), facecolors=colour, edgecolor="white", linewidth=0.4)
            for kind, micro, a, b in tl:  # the micro-batch number, where it fits
                if kind != 2 and (b - a) * 1000 > span_ms / 60:
                    lanes.text((a + b - 2 * t0) * 500, lane, str(micro), ha="center", va="center", fontsize=7,
                               color="black" if kind == 0 else "white")
        names = list(members) + [f"member {i}" for i in range(len(members), len(timelines))]
        lanes.set_yticks(range(len(timelines)))
        lanes.set_yticklabels([n + ("" if tl else " (left out)") for n, tl in zip(names, timelines)], fontsize=8)
        lanes.set_ylim(len(timelines) - 0.5, -0.5)  # ring order, top to bottom
        lanes.set_xlim(0, span_ms)
        lanes.set_xlabel("time (ms)")
        lanes.set_title("pipeline timeline of the last steps, one lane per member (numbers: micro-batches)", fontsize=10)
        lanes.legend(handles=[Patch(color=c, label=n) for n, c in _KINDS], loc="upper left", bbox_to_anchor=(1.0, 1.0),
                     fontsize=8)  # beside the lanes, never over an op
    fig.savefig(path, format="png")


def _write_basic(path: str | Path, losses: Sequence[float], timelines: Sequence[Sequence[Op]], events: Sequence[int]) -> None:
    """The dependency-free picture: the same data, no axes or labels."""
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
