"""The ring: who is in it, how they agree, and how they talk.

Layer: above ``transport`` and ``discovery``; knows nothing of models or plans.

Files:

- ``_view.py``         :class:`View`: members in ring order at an epoch
- ``_membership.py``   the leaderless agreement state machine (no sockets)
- ``_identity.py``     persisted node ids (held by a lock while a node runs), cluster secrets
- ``_peers.py``        the peer table: addresses, admission, gossip, static pseudo-peers
- ``_heartbeat.py``    the heartbeat record on the wire; the stall-aware clock
- ``_liveness.py``     liveness rules: the pulse keeps a blocked loop heard (bounded), a
                       woken loop does not blame its peers; timer checks
- ``_feed.py``         view-change notification: futures, async iterators, callbacks
- ``_node.py``         :class:`Node`: transport + discovery + membership on the host's loop
- ``_mailbox.py``      keyed delivery of application messages
- ``_segments.py``     pure ring arithmetic: who owns which segment, pieces, hops
- ``_allreduce.py``    :class:`RingAllReduce`: one object per all-reduce (reduce-scatter,
                       then all-gather), its message codes and tags
- ``_collectives.py``  :class:`Collectives`: all-reduce / all-gather / broadcast / barrier
                       over a view
- ``_tasks.py``        waiting on several tasks and cancelling them without unretrieved errors
"""

from __future__ import annotations

from p2ptrain.ring._collectives import Collectives, send_or_fail
from p2ptrain.ring._identity import (
    MIN_SECRET_BYTES,
    SECRET_ENV,
    IdClaim,
    check_secret,
    claim_node_id,
    default_state_dir,
    host_cards,
    load_or_create_node_id,
    new_node_id,
    read_secret,
    validate_node_id,
)
from p2ptrain.ring._mailbox import Mailbox, freeze_tag
from p2ptrain.ring._membership import Beat, Membership, MemberState
from p2ptrain.ring._node import MemberInfo, Node
from p2ptrain.ring._tasks import cancel_quietly, gather_within, wait_ended
from p2ptrain.ring._view import View

__all__ = [
    "MIN_SECRET_BYTES",
    "SECRET_ENV",
    "Beat",
    "Collectives",
    "IdClaim",
    "Mailbox",
    "MemberInfo",
    "MemberState",
    "Membership",
    "Node",
    "View",
    "cancel_quietly",
    "check_secret",
    "claim_node_id",
    "default_state_dir",
    "freeze_tag",
    "gather_within",
    "host_cards",
    "load_or_create_node_id",
    "new_node_id",
    "read_secret",
    "send_or_fail",
    "validate_node_id",
    "wait_ended",
]
