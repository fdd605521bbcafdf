"""The basic run picture (no matplotlib) is a valid PNG of the promised size, with the timeline drawn.

The labelled one (matplotlib) is tested in ``test_rough_edges.py``.
"""

from __future__ import annotations

import struct
import sys
import zlib

from p2ptrain.cli._plot import write_run_png


def test_png_is_valid_and_shows_ops(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the dependency-free picture
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = tmp_path / "run.png"
    timelines = [[(0, 0, 0.0, 1.0), (1, 0, 1.0, 2.0)], [(0, 1, 0.5, 1.5), (2, -1, 1.5, 2.0)]]
    assert write_run_png(path, [3.0, 2.5, 2.0], timelines) == "basic"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    idat = data.index(b"IDAT")
    (n,) = struct.unpack(">I", data[idat - 4 : idat])
    raw = zlib.decompress(data[idat + 4 : idat + 4 + n])
    assert len(raw) == h * (1 + 3 * w)
    # Some pixels carry colour (the ops and the curve), not only white and grey.
    px = {raw[i : i + 3] for i in range(1, len(raw) - 3, 3 * 37)}
    assert any(len(set(p)) > 1 for p in px)
