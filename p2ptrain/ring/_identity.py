"""Stable node ids and cluster secrets: where they come from and how they are kept.

A node id is persisted per device (``$XDG_STATE_HOME/p2ptrain/node_id``, default
``~/.local/state/p2ptrain/node_id``) so a device keeps its place in the ring across
restarts; ephemeral nodes (tests, the demo's local peers) get a fresh id instead. The
id embeds a random suffix, never a hardware serial, so copying a state folder between
machines is the only way to clone one — and the incarnation number then tells the two
apart (the newer start wins).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

from p2ptrain._errors import ConfigError

__all__ = ["SECRET_ENV", "default_state_dir", "load_or_create_node_id", "new_node_id", "read_secret", "validate_node_id"]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SECRET_ENV = "P2PTRAIN_SECRET"


def default_state_dir() -> Path:
    """Where per-device state (the node id) lives."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "p2ptrain"


def validate_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is a valid id.

    Raises:
        ConfigError: it is empty, too long, or has characters other than letters,
            digits, ``.``, ``_`` and ``-``.
    """
    if not isinstance(node_id, str) or not _ID_RE.fullmatch(node_id):
        raise ConfigError(
            f"node id {node_id!r} is invalid: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return node_id


def new_node_id() -> str:
    """A fresh id: the host name (trimmed) plus 8 random hex digits."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40].strip("-") or "node"
    return f"{host}-{secrets.token_hex(4)}"


def load_or_create_node_id(state_dir: Path | None = None) -> str:
    """The persisted id of this device, created on first use.

    Raises:
        ConfigError: the stored id is corrupt (the message names the file to delete).
    """
    path = (state_dir or default_state_dir()) / "node_id"
    if path.exists():
        text = path.read_text().strip()
        try:
            return validate_node_id(text)
        except ConfigError:
            raise ConfigError(f"{path} holds an invalid node id {text!r}; delete the file to get a new one") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    node_id = new_node_id()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    tmp.replace(path)  # atomic: two nodes starting at once never see half a file
    return node_id


def read_secret(*, secret_file: str | os.PathLike[str] | None = None, env: bool = True) -> bytes | None:
    """The cluster secret from a file or the ``P2PTRAIN_SECRET`` environment variable.

    Returns:
        The secret bytes (surrounding whitespace stripped), or None when none is set.

    Raises:
        ConfigError: the file is missing, unreadable, empty or readable by others.
    """
    if secret_file is not None:
        path = Path(secret_file)
        try:
            data = path.read_bytes().strip()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from exc
        if not data:
            raise ConfigError(f"the secret file {path} is empty")
        if mode & 0o077:
            raise ConfigError(f"the secret file {path} is readable by other users; run: chmod 600 {path}")
        return data
    if env and os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV].strip().encode()
    return None
