"""The keyed mailbox: held messages and forgetting a finished job's leftovers."""

from __future__ import annotations

from p2ptrain.ring._mailbox import Mailbox
from p2ptrain.transport import Message


def test_a_jobs_leftovers_are_forgotten_and_nothing_else() -> None:
    box = Mailbox(max_pending=8)
    box.deliver(Message(sender="a", kind="pp.act", epoch=3, tag=["d0/vm-1/abc/01", 0, 1, 0]))
    box.deliver(Message(sender="a", kind="coll", epoch=3, tag=["d0/vm-1/abc/01/pp.stage1", 4, 1]))
    box.deliver(Message(sender="b", kind="pp.probe", epoch=3, tag=["d0", "vm-1/abc/01", 2]))
    box.deliver(Message(sender="b", kind="pp.act", epoch=3, tag=["d0/vm-2/def/02", 0, 1, 0]))
    assert len(box) == 4
    assert box.drop_tagged("vm-1/abc/01") == 3
    assert len(box) == 1 and box.drop_tagged("vm-1/abc/01") == 0
