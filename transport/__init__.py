"""p2ptrain.transport: the wire (installed as ``p2ptrain.transport``)."""

from __future__ import annotations

__all__: list[str] = []
