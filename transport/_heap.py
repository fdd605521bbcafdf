"""Keep freed memory in the C heap, so ZeroMQ's receive buffers stop costing page faults.

Why: libzmq allocates every received frame of more than a few KiB with ``malloc`` on its
I/O thread and frees it when the frame is consumed. glibc's dynamic thresholds hand a
1 MiB block back to the kernel (``munmap``, or trimming the heap top) soon after it is
freed, so the next frame faults its pages in again. Measured here, 64 MiB all-reduce
over 4 processes: ~35,000 minor page faults and ~80 ms of system time per call across
the processes; with the thresholds below, ~1,000 faults and system time level with
gloo's (which receives into preallocated buffers).

This changes process-wide allocator settings, so like ``uvloop`` it is the entry
point's decision (the CLI, a bench worker, a robot's main), never done on import or by
an endpoint on its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["keep_heap_warm"]

logger = logging.getLogger("p2ptrain.transport")

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap instead of their own mapping: glibc's
#: largest allowed value (HEAP_MAX_SIZE / 2 on 64-bit), above the 1 MiB frames and 4 MiB
#: pieces the wire carries.
MMAP_THRESHOLD = 32 << 20
#: Free memory at the heap top kept before glibc gives it back: a few dozen frames in
#: flight (receive high-water marks of 16 messages per peer) fit in it.
TRIM_THRESHOLD = 256 << 20


def keep_heap_warm(*, mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Tell glibc to keep freed blocks for reuse (``mallopt``); call once from an entry point.

    The cost: a process may hold up to ``trim_threshold`` bytes of freed heap more than
    before, per malloc arena.

    Returns:
        True when the settings were applied; False where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl's mallopt is a stub)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    if not ok:
        logger.debug("mallopt refused mmap_threshold=%d trim_threshold=%d", mmap_threshold, trim_threshold)
    return ok
