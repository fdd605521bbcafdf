"""Suite-wide settings: one torch thread per process (2-core CI; several nodes per test)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
# Test helpers (``_ring.py`` etc.) live beside the tests that use them.
for sub in ("p2ptrain",):
    sys.path.insert(0, str(Path(__file__).parent / sub))
