"""Stable node ids and cluster secrets: where they come from and how they are kept.

A node id is persisted per device (``$XDG_STATE_HOME/p2ptrain/node_id``, default
``~/.local/state/p2ptrain/node_id``) so a device keeps its place in the ring across
restarts; ephemeral nodes (tests, the demo's local peers) get a fresh id instead. The
id embeds a random suffix, never a hardware serial, so copying a state folder between
machines is the only way to clone one. That happens on a Friday afternoon: a team sets up
one Jetson, images its SD card and flashes four more. So the MAC addresses of the
device's network cards are kept beside the id (``node_id.host``); a device that finds
none of them among its own cards knows the folder was copied and takes a fresh id (with
a warning). Adding or swapping a card keeps the id while one recorded card remains. Two
devices that still share an id (a machine with no readable cards, an explicit
``--node-id``) are named by discovery, which warns when it hears its own id from
another address.

Two nodes on one device must not share the persisted id: each would take the other's
heartbeats for its own and both would stay alone. A node that runs with it holds an
exclusive lock on ``node_id.lock`` beside it (:func:`claim_node_id`); a second node on
the same state folder gets a fresh id for that run, with a warning that names the fix.

A secret is read the same way wherever it comes from (file, environment, the library's
``Node(secret=...)``): surrounding whitespace, such as a file's trailing newline, is not
part of it (:func:`check_secret`).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import sys
from pathlib import Path

from p2ptrain._errors import ConfigError

if sys.platform != "win32":
    import fcntl

__all__ = [
    "MIN_SECRET_BYTES",
    "SECRET_ENV",
    "IdClaim",
    "check_secret",
    "claim_node_id",
    "default_state_dir",
    "host_cards",
    "load_or_create_node_id",
    "new_node_id",
    "read_secret",
    "validate_node_id",
]

logger = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SECRET_ENV = "P2PTRAIN_SECRET"
# mDNS publishes a fingerprint of the key derived from the secret, so a short (human)
# secret could be guessed offline; 16 random bytes (128 bits) cannot.
MIN_SECRET_BYTES = 16


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


_SYS_NET = Path("/sys/class/net")


def host_cards(sys_net: Path = _SYS_NET) -> set[str]:
    """Burned-in MAC addresses of this machine's physical network cards; empty where none can be read.

    Physical means the interface has a ``device`` (virtual ones: loopback, bridges, veth,
    tunnels have none), so containers and network namespaces usually read empty. Only
    permanent addresses count (``addr_assign_type`` 0): a random or configured one (Wi-Fi
    MAC randomisation, an address set from the disk image) says nothing of the hardware.
    """
    cards: set[str] = set()
    try:
        names = [p for p in sys_net.iterdir() if (p / "device").exists()]
    except OSError:
        return cards
    for p in names:
        try:
            if (p / "addr_assign_type").read_text().strip() != "0":
                continue
            mac = (p / "address").read_text().strip().lower()
        except (OSError, ValueError):  # gone meanwhile, or not text
            continue
        if re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac) and mac != "00:00:00:00:00:00":
            cards.add(mac)
    return cards


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: two nodes starting at once never see half a file


def _record_cards(host: Path, cards: set[str]) -> None:
    """Keep ``cards`` beside the id; best effort (a read-only state folder keeps the old record)."""
    try:
        if cards:
            _write_atomic(host, "".join(f"{m}\n" for m in sorted(cards)))
        else:
            host.unlink(missing_ok=True)
    except OSError as exc:
        logger.debug("cannot record this device's network cards in %s: %s", host, exc)


def _recorded_cards(path: Path) -> set[str]:
    try:
        return {line.strip().lower() for line in path.read_text().splitlines() if line.strip()}
    except (OSError, ValueError):  # none recorded, or a corrupt record: nothing to compare
        return set()


def load_or_create_node_id(state_dir: Path | None = None, *, sys_net: Path = _SYS_NET) -> str:
    """The persisted id of this device, created on first use or when the folder was copied.

    Args:
        state_dir: the state folder (default :func:`default_state_dir`).
        sys_net: where the network cards are read (tests pass a folder of their own).

    Raises:
        ConfigError: the stored id is corrupt (the message names the file to delete).
        OSError: there is no id yet and the state folder cannot be written.
    """
    path = (state_dir or default_state_dir()) / "node_id"
    host = path.with_name("node_id.host")
    here = host_cards(sys_net)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = new_node_id()
        _write_atomic(path, fresh + "\n")  # the id first: a crash before the cards only costs another new id
        _record_cards(host, here)
        return fresh
    text = path.read_text().strip()
    try:
        node_id = validate_node_id(text)
    except ConfigError:
        raise ConfigError(f"{path} holds an invalid node id {text!r}; delete the file to get a new one") from None
    made_on = _recorded_cards(host)
    if not (here and made_on and not here & made_on):
        if here and here != made_on:  # first start since they were recorded, or a card added or swapped
            _record_cards(host, here)
        return node_id
    fresh = new_node_id()
    try:
        _write_atomic(path, fresh + "\n")
        kept = "and keeps it"
    except OSError as exc:
        kept = f"for this run only ({path} cannot be written: {exc.strerror})"
    else:
        _record_cards(host, here)
    logger.warning(
        "%s holds the id %s of another machine (its network cards %s are not here: a cloned disk image or a copied "
        "state folder?); this device takes the new id %s %s, so the two can train together",
        path, node_id, ", ".join(sorted(made_on)), fresh, kept,
    )
    return fresh


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


def check_secret(secret: bytes | str | None) -> bytes | None:
    """The secret as every entry point reads it: bytes, surrounding whitespace stripped.

    ``open(path, "rb").read()`` keeps a file's trailing newline, and ``--secret-file``
    strips it; both must derive the same key, or the nodes refuse each other.

    Returns:
        The stripped secret, or None when ``secret`` is None (no secret).

    Raises:
        ConfigError: fewer than :data:`MIN_SECRET_BYTES` bytes are left.
    """
    if secret is None:
        return None
    raw = (secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)).strip()
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the cluster secret has {len(raw)} bytes (surrounding whitespace not counted); use at least "
            f"{MIN_SECRET_BYTES} random ones, e.g. `python3 -c 'import secrets; print(secrets.token_hex(16))' > secret "
            "&& chmod 600 secret`"
        )
    return raw


class IdClaim:
    """The id a node runs with and, for the device's persisted id, the lock that holds it.

    Attributes:
        node_id: the id.
        persisted: True when it is the device's persisted id (the lock is held until
            :meth:`release`).
    """

    def __init__(self, node_id: str, lock_fd: int | None = None) -> None:
        self.node_id = node_id
        self.persisted = lock_fd is not None
        self._fd = lock_fd

    def release(self) -> None:
        """Let another node on this device take the persisted id. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock

    def __del__(self) -> None:  # a node dropped without close() must not keep the id
        try:
            self.release()
        except OSError:
            pass


def claim_node_id(node_id: str | None = None, *, ephemeral: bool = False, state_dir: Path | None = None,
                  sys_net: Path = _SYS_NET) -> IdClaim:
    """Choose a node's id: ``node_id``, a fresh one, or the device's persisted one, held.

    The persisted id is held by an exclusive ``flock`` on ``<state_dir>/node_id.lock``
    (released with the claim, or by the OS when the process dies, even by ``kill -9``).
    When another node holds it, this one gets a fresh id for this run and a warning
    names the holder's pid and the fix (``--ephemeral`` / ``--node-id``).

    Raises:
        ConfigError: ``node_id`` is invalid, or the stored id is corrupt.
    """
    if node_id is not None:
        return IdClaim(validate_node_id(node_id))
    if ephemeral:
        return IdClaim(new_node_id())
    state = state_dir or default_state_dir()
    if sys.platform == "win32":  # no flock: two nodes there need ephemeral or their own node_id
        return IdClaim(load_or_create_node_id(state, sys_net=sys_net))
    lock = state / "node_id.lock"
    try:
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only state folder: nothing to guard against writing
        logger.debug("cannot lock %s (%s); running without the lock", lock, exc)
        return IdClaim(load_or_create_node_id(state, sys_net=sys_net))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        # Only read it: the holder may be writing it right now (both started at once), and
        # a second writer would leave the file naming an id that no node runs with.
        path = state / "node_id"
        try:
            persisted = path.read_text().strip() or "(being written)"
        except OSError:
            persisted = "(being written)"
        fresh = new_node_id()
        logger.warning(
            "another p2ptrain node on this device (pid %s) runs with the persisted node id %s (%s); this one runs "
            "as %s for this run only. Give each node on one device --ephemeral or its own --node-id "
            "(library: ephemeral=True or node_id=...)", holder, persisted, state / "node_id", fresh,
        )
        return IdClaim(fresh)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the warning another node prints
        return IdClaim(load_or_create_node_id(state, sys_net=sys_net), fd)
    except BaseException:
        os.close(fd)
        raise
