"""Views of the ring: who is in it, in what order, at which epoch.

A :class:`View` is immutable. The ring order is a deterministic function of the member
set (sorted node ids), so every member that agrees on the set agrees on the ring, its
successors and predecessors, without anyone handing the order out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from p2ptrain._errors import MembershipError

__all__ = ["View"]


@dataclass(frozen=True)
class View:
    """One agreed membership of the ring.

    Attributes:
        epoch: increases with every agreed change; messages tagged with an older
            epoch are dropped by the runtime.
        members: node ids in ring order.
    """

    epoch: int
    members: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.epoch < 0:
            raise MembershipError(f"view epoch must be >= 0, got {self.epoch}")
        if list(self.members) != sorted(set(self.members)):
            raise MembershipError(f"view members must be unique and in ring order, got {self.members!r}")
        object.__setattr__(self, "_index", {m: i for i, m in enumerate(self.members)})

    @classmethod
    def of(cls, epoch: int, members: Iterable[str]) -> View:
        """A view of ``members`` (any order) at ``epoch``; the ring order is derived."""
        return cls(epoch, tuple(sorted(set(members))))

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._index

    def rank(self, node_id: str) -> int:
        """Position of ``node_id`` in the ring.

        Raises:
            MembershipError: ``node_id`` is not a member of this view.
        """
        try:
            return self._index[node_id]
        except KeyError:
            raise MembershipError(f"{node_id!r} is not a member of view {self.epoch} {list(self.members)}") from None

    def successor(self, node_id: str) -> str:
        """The next member clockwise (itself in a ring of one)."""
        return self.members[(self.rank(node_id) + 1) % len(self.members)]

    def predecessor(self, node_id: str) -> str:
        """The previous member (itself in a ring of one)."""
        return self.members[(self.rank(node_id) - 1) % len(self.members)]

    @property
    def digest(self) -> str:
        """Short stable digest of (epoch, members), for logs and cross-checks."""
        h = hashlib.sha256(f"{self.epoch}|{'|'.join(self.members)}".encode())
        return h.hexdigest()[:12]
