"""The ring: who is in it, how they agree, and how they talk.

Layer: above ``transport`` and ``discovery``; knows nothing of models or plans.

Files:

- ``_view.py``         :class:`View`: members in ring order at an epoch
- ``_membership.py``   the leaderless agreement state machine (no sockets)
- ``_identity.py``     persisted node ids, cluster secrets
- ``_node.py``         :class:`Node`: transport + discovery + membership on the host's loop
- ``_mailbox.py``      keyed delivery of application messages
- ``_collectives.py``  ring all-reduce / all-gather / broadcast / barrier over a view
"""

from __future__ import annotations

from p2ptrain.ring._view import View
from p2ptrain.ring._membership import Beat, Membership, MemberState
from p2ptrain.ring._identity import (
    SECRET_ENV,
    default_state_dir,
    load_or_create_node_id,
    new_node_id,
    read_secret,
    validate_node_id,
)
from p2ptrain.ring._mailbox import Mailbox, freeze_tag
from p2ptrain.ring._node import MemberInfo, Node
from p2ptrain.ring._collectives import Collectives, send_or_fail

__all__ = [
    "SECRET_ENV",
    "Beat",
    "Collectives",
    "Mailbox",
    "MemberInfo",
    "MemberState",
    "Membership",
    "Node",
    "View",
    "default_state_dir",
    "freeze_tag",
    "load_or_create_node_id",
    "new_node_id",
    "read_secret",
    "send_or_fail",
    "validate_node_id",
]
