"""p2ptrain.discovery: finding peers (installed as ``p2ptrain.discovery``)."""

from __future__ import annotations

__all__: list[str] = []
