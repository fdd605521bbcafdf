"""The ring's segment and piece arithmetic, without tensors or a network."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from p2ptrain import ConfigError
from p2ptrain.ring._segments import (
    RingLayout,
    all_gather_segment,
    broadcast_hops,
    owned_segment,
    piece_ranges,
    reduce_scatter_segment,
    segment_bounds,
)


@pytest.mark.parametrize("members", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("numel", [0, 1, 2, 3, 4, 5, 6, 10, 1001, 4096, 10**6 + 3])
def test_segments_tile_the_tensor_evenly(numel: int, members: int) -> None:
    segs = segment_bounds(numel, members)
    assert len(segs) == members
    assert segs[0][0] == 0 and segs[-1][1] == numel
    assert all(a <= b for a, b in segs)
    assert all(segs[i][1] == segs[i + 1][0] for i in range(members - 1)), "contiguous, no gap or overlap"
    lengths = {b - a for a, b in segs}
    assert max(lengths) - min(lengths) <= 1
    # The same cut points as the float formula the ring has always used (wire compatibility).
    assert [a for a, _ in segs] == [math.floor(i * numel / members) for i in range(members)]


def test_fewer_elements_than_members_leaves_empty_segments() -> None:
    assert segment_bounds(2, 5) == [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2)]
    assert segment_bounds(1, 3) == [(0, 0), (0, 0), (0, 1)]


@pytest.mark.parametrize(("numel", "element_size", "piece_bytes", "want"), [
    (0, 4, 4096, []),
    (1, 4, 4096, [(0, 1)]),
    (1024, 4, 4096, [(0, 1024)]),
    (1025, 4, 4096, [(0, 1024), (1024, 1025)]),
    (2500, 4, 4096, [(0, 1024), (1024, 2048), (2048, 2500)]),
    (3, 8, 4, [(0, 1), (1, 2), (2, 3)]),  # a piece smaller than an element still holds one
])
def test_pieces_cut_by_bytes_with_a_short_tail(numel: int, element_size: int, piece_bytes: int,
                                               want: list[tuple[int, int]]) -> None:
    assert piece_ranges(numel, element_size, piece_bytes) == want


@pytest.mark.parametrize("members", [2, 3, 4, 5])
def test_reduce_scatter_passes_each_segment_once_round_the_ring(members: int) -> None:
    # Segment k starts at member k (step 0 sends its own) and is added into by every
    # member after it; after members - 1 steps the member before k owns it, complete.
    for seg in range(members):
        holder, touched = seg, [seg]
        for step in range(members - 1):
            nxt = (holder + 1) % members
            assert reduce_scatter_segment(nxt, step, members) == seg
            holder = nxt
            touched.append(holder)
        assert sorted(touched) == list(range(members)), "every member adds its part exactly once"
        assert owned_segment(holder, members) == seg


@pytest.mark.parametrize("members", [2, 3, 4, 5])
def test_all_gather_delivers_every_owned_segment_to_everyone(members: int) -> None:
    for rank in range(members):
        got = {owned_segment(rank, members)} | {all_gather_segment(rank, s, members) for s in range(members - 1)}
        assert got == set(range(members))
        # Step 0 brings the predecessor's owned segment.
        assert all_gather_segment(rank, 0, members) == owned_segment((rank - 1) % members, members)


def test_broadcast_hops_count_along_the_ring() -> None:
    assert [broadcast_hops(r, 2, 4) for r in range(4)] == [2, 3, 0, 1]


def test_layout_pieces_are_absolute_and_cover_their_segment() -> None:
    layout = RingLayout(numel=5000, members=3, element_size=4, piece_bytes=4096)
    assert layout.segment(1) == (1666, 3333)
    assert layout.pieces(1) == [(1666, 2690), (2690, 3333)]
    covered = [i for s in range(3) for a, b in layout.pieces(s) for i in range(a, b)]
    assert covered == list(range(5000))


@pytest.mark.parametrize(("call", "match"), [
    (lambda: segment_bounds(-1, 2), "numel must be >= 0"),
    (lambda: segment_bounds(4, 0), "at least one member"),
    (lambda: piece_ranges(4, 0, 4096), "element_size must be >= 1"),
    (lambda: RingLayout(10, 0, 4, 4096), "at least one member"),
])
def test_bad_arguments_name_the_value(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()
