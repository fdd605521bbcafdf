"""Suite-wide settings: one torch thread per process (2-core CI; several nodes per test)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
# Jobs measure afresh in the suite (and write nothing under ~/.local/state); the tests of
# the profile cache turn it on for themselves with a tmp directory. Child processes inherit it.
os.environ.setdefault("P2PTRAIN_PROFILE_CACHE", "off")
# Test helpers (``_ring.py`` etc.) live beside the tests that use them.
for sub in ("p2ptrain",):
    sys.path.insert(0, str(Path(__file__).parent / sub))
