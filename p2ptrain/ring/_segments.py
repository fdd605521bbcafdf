"""Ring arithmetic: which elements each member owns at each step, and how they are cut into pieces.

Pure functions of integers, no tensors and no sockets, so every member computes the
same layout from ``(numel, members, element size, piece bytes)`` alone and the layout is
tested without a network.

A tensor of ``numel`` elements is split into ``members`` contiguous segments, segment
``i`` covering ``[floor(i * numel / n), floor((i + 1) * numel / n))``: sizes differ by at
most one and a segment may be empty (``numel < members``). Each segment is streamed in
pieces of ``piece_bytes // element_size`` elements (the last one may be short).

In the ring all-reduce, member ``r`` sends its own segment ``r`` at reduce-scatter step
0; at step ``s`` it receives segment :func:`reduce_scatter_segment` ``(r - s - 1) % n``,
adds its own values and forwards it at step ``s + 1``. After ``n - 1`` steps it holds
segment :func:`owned_segment` ``(r + 1) % n`` fully reduced. In the all-gather phase it
receives segment :func:`all_gather_segment` ``(r - s) % n`` at step ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2ptrain._errors import ConfigError

__all__ = [
    "RingLayout",
    "all_gather_segment",
    "broadcast_hops",
    "owned_segment",
    "piece_ranges",
    "reduce_scatter_segment",
    "segment_bounds",
]


def _check_members(members: int) -> None:
    if members < 1:
        raise ConfigError(f"a ring needs at least one member, got members={members}")


def segment_bounds(numel: int, members: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` element range of each member's segment, in ring order.

    Args:
        numel: elements in the flat tensor (>= 0).
        members: ring size (>= 1).

    Returns:
        ``members`` contiguous ranges covering ``[0, numel)``; lengths differ by at most
        one, and some are empty when ``numel < members``.

    Raises:
        ConfigError: ``numel`` is negative or ``members`` is below 1.
    """
    _check_members(members)
    if numel < 0:
        raise ConfigError(f"numel must be >= 0, got {numel}")
    # Integer division: equal to the former float form floor(i * numel / n) whenever
    # i * numel < 2**53 (far beyond any tensor a member can hold), and exact beyond it.
    cuts = [i * numel // members for i in range(members + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(members)]


def piece_ranges(numel: int, element_size: int, piece_bytes: int) -> list[tuple[int, int]]:
    """Cut ``numel`` elements into streaming pieces of at most ``piece_bytes`` each.

    Args:
        numel: elements to cut (>= 0).
        element_size: bytes per element (>= 1).
        piece_bytes: target bytes per piece; a piece holds at least one element.

    Returns:
        Contiguous ``[start, stop)`` ranges relative to the start, in order; empty for
        ``numel == 0``. All but the last hold ``max(1, piece_bytes // element_size)``
        elements.

    Raises:
        ConfigError: ``numel`` is negative or ``element_size`` is below 1.
    """
    if numel < 0:
        raise ConfigError(f"numel must be >= 0, got {numel}")
    if element_size < 1:
        raise ConfigError(f"element_size must be >= 1, got {element_size}")
    per = max(1, piece_bytes // element_size)
    return [(a, min(a + per, numel)) for a in range(0, numel, per)]


def reduce_scatter_segment(rank: int, step: int, members: int) -> int:
    """The segment member ``rank`` receives (and adds into) at reduce-scatter ``step``.

    It is also the segment whose contribution started at member ``(rank - step - 1) % n``,
    which is why a plain ring all-gather of whole tensors uses the same formula for the
    origin of what arrives at ``step``.
    """
    _check_members(members)
    return (rank - step - 1) % members


def owned_segment(rank: int, members: int) -> int:
    """The segment member ``rank`` holds fully reduced after the reduce-scatter phase."""
    _check_members(members)
    return (rank + 1) % members


def all_gather_segment(rank: int, step: int, members: int) -> int:
    """The reduced segment member ``rank`` receives at all-gather ``step``.

    At step 0 that is its predecessor's owned segment; each later step brings the one
    owned a member further back.
    """
    _check_members(members)
    return (rank - step) % members


def broadcast_hops(rank: int, root: int, members: int) -> int:
    """How many hops along the ring the broadcast takes from ``root`` to ``rank`` (0 at the root)."""
    _check_members(members)
    return (rank - root) % members


@dataclass(frozen=True)
class RingLayout:
    """The segments and pieces of one flat tensor over a ring.

    Every member must build it from the same arguments; the message tags of an
    all-reduce name pieces by their index in :meth:`pieces`.

    Args:
        numel: elements in the flat tensor.
        members: ring size.
        element_size: bytes per element.
        piece_bytes: streaming granularity (same on every member).
    """

    numel: int
    members: int
    element_size: int
    piece_bytes: int
    _bounds: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Validate eagerly: a bad layout would otherwise surface as a wrong tag mid-run.
        piece_ranges(0, self.element_size, self.piece_bytes)
        object.__setattr__(self, "_bounds", tuple(segment_bounds(self.numel, self.members)))

    def segment(self, index: int) -> tuple[int, int]:
        """The ``[start, stop)`` element range of segment ``index``."""
        return self._bounds[index]

    def pieces(self, index: int) -> list[tuple[int, int]]:
        """Absolute ``[start, stop)`` element ranges of the pieces of segment ``index``, in order."""
        a, b = self.segment(index)
        return [(a + x, a + y) for x, y in piece_ranges(b - a, self.element_size, self.piece_bytes)]
