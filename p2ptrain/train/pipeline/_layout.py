"""Layouts: which layers, and which rows of every micro-batch, each member runs.

A layout is a list of :class:`Stage`: each holds a contiguous run of layers and the
members that run it, each with a fixed share of every micro-batch's samples (one
member with the whole micro-batch is a plain pipeline stage; several members are a
data-parallel group inside the stage).

Messages follow the samples: a member's output rows go to the members of the next
stage whose share overlaps them, its input-gradient rows go back the same way, and
the first stage sends each micro-batch's targets to the last. :class:`Seat` works out
those routes for one member once; everything here is arithmetic, with no sockets, so
it is the same on every member and testable without a network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from p2ptrain._errors import ConfigError

__all__ = [
    "ACT",
    "GRAD",
    "LBL",
    "Piece",
    "Route",
    "Seat",
    "Stage",
    "check_layout",
    "even_split",
    "layout_from_plan",
    "layout_from_wire",
    "layout_to_wire",
    "overlaps",
]

# Message kinds: a stage's output rows (forward), input-gradient rows (backward), and
# the targets the first stage sends straight to the last.
ACT, GRAD, LBL = "pp.act", "pp.grad", "pp.lbl"


class Piece(NamedTuple):
    """One inbound message of a step: ``kind`` rows of micro-batch ``micro`` from row ``row``.

    Within a step, a member receives at most one piece per (kind, micro, first row), so
    this names it; on the wire it is the tag ``[digest, step, micro, row]`` under ``kind``.
    """

    kind: str
    micro: int
    row: int
    peer: str = ""  # the member that sends it (a wait on one that left in order ends at once)


class Route(NamedTuple):
    """Rows ``lo..hi`` (of a micro-batch) exchanged with ``peer``."""

    peer: str
    lo: int
    hi: int


@dataclass(frozen=True)
class Stage:
    """One stage of a layout: layers ``first_layer..last_layer`` on ``members``.

    Attributes:
        first_layer: index of the stage's first layer.
        last_layer: index of its last layer (inclusive).
        members: ``(node_id, samples)`` pairs: each member runs that many samples of
            every micro-batch, in this order (the first takes the first rows).
    """

    first_layer: int
    last_layer: int
    members: tuple[tuple[str, int], ...]

    def slices(self) -> list[tuple[str, int, int]]:
        """``(node_id, lo, hi)``: the rows of each micro-batch each member runs."""
        out, lo = [], 0
        for node_id, n in self.members:
            out.append((node_id, lo, lo + n))
            lo += n
        return out


def even_split(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous (first, last) layer ranges, as even as possible, earlier stages larger.

    Raises:
        ConfigError: more stages than layers.
    """
    if stages > n_layers:
        raise ConfigError(f"{stages} stages but the model has only {n_layers} layers")
    base, extra = divmod(n_layers, stages)
    out, a = [], 0
    for k in range(stages):
        b = a + base + (1 if k < extra else 0)
        out.append((a, b - 1))
        a = b
    return out


def layout_from_plan(plan: Any) -> list[Stage]:
    """The layout of a :class:`~p2ptrain.plan.Plan` (anything with ``stages`` of that shape)."""
    return [Stage(st.first_layer, st.last_layer, tuple(zip(st.node_ids, st.shares))) for st in plan.stages]


def layout_to_wire(stages: Sequence[Stage], micro: int) -> list[Any]:
    """A layout and its micro-batch count as plain msgpack-able data."""
    return [[[st.first_layer, st.last_layer, [[m, n] for m, n in st.members]] for st in stages], micro]


def layout_from_wire(d: Any) -> tuple[list[Stage], int]:
    """Decode :func:`layout_to_wire`'s data (it came from the network: checked again by :func:`check_layout`).

    Raises:
        ConfigError: it is malformed.
    """
    try:
        stages, micro = d
        out = [Stage(int(a), int(b), tuple((str(m), int(n)) for m, n in members)) for a, b, members in stages]
        if type(micro) is not int or micro < 1 or not out:
            raise ValueError("no stages or a bad micro-batch count")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"malformed layout: {exc}") from None
    return out, micro


def overlaps(slices: Sequence[tuple[str, int, int]], lo: int, hi: int) -> list[Route]:
    """The parts of rows ``lo..hi`` held by each of ``slices``, in row order (empty parts left out)."""
    return [Route(peer, max(lo, a), min(hi, b)) for peer, a, b in slices if max(lo, a) < min(hi, b)]


def check_layout(
    stages: Sequence[Stage] | Sequence[tuple[int, int]],
    members: Sequence[str],
    micro_batch: int,
    n_layers: int,
) -> list[Stage]:
    """The layout ``stages`` describes, checked against the view and the model.

    Args:
        stages: :class:`Stage` objects, or plain ``(first, last)`` layer ranges, one per
            view member in ring order (a plain pipeline, each member with the whole
            micro-batch).
        members: the view's members, in ring order.
        micro_batch: samples per micro-batch.
        n_layers: layers in the model.

    Returns:
        The layout as :class:`Stage` objects.

    Raises:
        ConfigError: a mix of forms, ranges not one per member, shares that are not
            positive or do not sum to ``micro_batch``, a member twice or not in the view,
            or layers not covered exactly once in order.
    """
    layout = _as_stages(stages, members, micro_batch)
    covered = [i for st in layout for i in range(st.first_layer, st.last_layer + 1)]
    if covered != list(range(n_layers)):
        ranges = [(st.first_layer, st.last_layer) for st in layout]
        raise ConfigError(f"stages {ranges} must cover layers 0..{n_layers - 1} contiguously, in order")
    return layout


def _as_stages(stages: Sequence[Stage] | Sequence[tuple[int, int]], members: Sequence[str], micro_batch: int) -> list[Stage]:
    ranges = [s for s in stages if isinstance(s, tuple)]
    if len(ranges) == len(stages):
        if len(ranges) != len(members):
            raise ConfigError(f"{len(ranges)} stage ranges for a ring of {len(members)} members")
        return [Stage(a, b, ((m, micro_batch),)) for (a, b), m in zip(ranges, members)]
    layout = [s for s in stages if isinstance(s, Stage)]
    if len(layout) != len(stages) or not layout:
        raise ConfigError("stages must be all Stage objects or all (first, last) ranges, and not empty")
    seen: list[str] = []
    for st in layout:
        if not st.members or sum(n for _, n in st.members) != micro_batch or any(n < 1 for _, n in st.members):
            raise ConfigError(f"stage {st.first_layer}-{st.last_layer}: shares {list(st.members)} must be >= 1 "
                              f"and sum to the micro-batch size {micro_batch}")
        seen += [m for m, _ in st.members]
    if len(set(seen)) != len(seen) or not set(seen) <= set(members):
        raise ConfigError(f"layout members {seen} must be distinct members of the view {list(members)}")
    return layout


@dataclass(frozen=True)
class Seat:
    """One member's place in a layout and the routes of its messages.

    Attributes:
        stage_index: the member's stage.
        n_stages: stages in the layout.
        lo: first row of every micro-batch the member runs.
        hi: one past its last row.
        micro_batch: samples per micro-batch (the stage's shares summed).
        upstream: previous-stage members holding parts of rows ``lo..hi``: activations
            come from them and input-gradients go back to them (empty on the first stage).
        downstream: the same for the next stage: activations go to them and gradients
            come from them (empty on the last stage).
        labels_from: on a last stage that is not also first, the first-stage members
            that send the targets of rows ``lo..hi``.
        labels_to: on a first stage that is not also last, the last-stage members the
            targets of rows ``lo..hi`` go to.
    """

    stage_index: int
    n_stages: int
    lo: int
    hi: int
    micro_batch: int
    upstream: tuple[Route, ...]
    downstream: tuple[Route, ...]
    labels_from: tuple[Route, ...]
    labels_to: tuple[Route, ...]

    @classmethod
    def of(cls, layout: Sequence[Stage], node_id: str) -> Seat | None:
        """``node_id``'s seat in ``layout``, or None if the layout leaves it out."""
        s = next((k for k, st in enumerate(layout) if any(m == node_id for m, _ in st.members)), None)
        if s is None:
            return None
        st, last = layout[s], len(layout) - 1
        lo, hi = next((a, b) for m, a, b in st.slices() if m == node_id)
        return cls(
            stage_index=s,
            n_stages=len(layout),
            lo=lo,
            hi=hi,
            micro_batch=sum(n for _, n in st.members),
            upstream=tuple(overlaps(layout[s - 1].slices(), lo, hi)) if s > 0 else (),
            downstream=tuple(overlaps(layout[s + 1].slices(), lo, hi)) if s < last else (),
            labels_from=tuple(overlaps(layout[0].slices(), lo, hi)) if s == last and s > 0 else (),
            labels_to=tuple(overlaps(layout[-1].slices(), lo, hi)) if s == 0 and s < last else (),
        )

    @property
    def is_first(self) -> bool:
        """The member reads the inputs (and targets) from the dataset."""
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        """The member applies the criterion."""
        return self.stage_index == self.n_stages - 1

    def rows(self, micro: int) -> slice:
        """This member's positions in the global batch, within micro-batch ``micro``."""
        return slice(micro * self.micro_batch + self.lo, micro * self.micro_batch + self.hi)

    def loss_scale(self, micro_batches: int) -> float:
        """The factor on the criterion's mean over this member's rows.

        ``share / micro_batch / micro_batches``: summed over a group and accumulated over
        the micro-batches, the scaled losses (and their gradients) are the mean over the
        global batch, which is what one device computes.
        """
        return (self.hi - self.lo) / self.micro_batch / micro_batches

    def inbound(self, micro_batches: int) -> list[Piece]:
        """Every piece this member receives in a step, micro-batch by micro-batch."""
        want: list[Piece] = []
        for m in range(micro_batches):
            want += [Piece(ACT, m, r.lo, r.peer) for r in self.upstream]
            want += [Piece(LBL, m, r.lo, r.peer) for r in self.labels_from]
            want += [Piece(GRAD, m, r.lo, r.peer) for r in self.downstream]
        return want
