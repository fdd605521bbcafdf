"""The thin adapter under the testbed: runs ``ip``/``tc``, applies plan steps, asks the kernel.

Every failure leaves here as a :class:`~p2ptrain._errors.P2PTrainError` that carries the
failed command and its stderr, so ``p2ptrain testbed up`` can say exactly what the kernel
refused. Fault injection for tests subclasses :class:`Executor`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence

from p2ptrain._errors import P2PTrainError

from ._plan import Command, MakeDir, Step, WriteFile

__all__ = ["Executor", "ROOT_MESSAGE", "list_netns", "netns_pids", "probe_netem", "require_root", "run_cmd"]

logger = logging.getLogger(__name__)

ROOT_MESSAGE = "p2ptrain testbed needs root: it creates network namespaces and cgroups; run with sudo"
# Every ip/tc call is a local netlink round trip (milliseconds); 30 s means the kernel is stuck.
_CMD_TIMEOUT_S = 30.0


def require_root() -> None:
    """Fail fast unless running as root with iproute2 present.

    Raises:
        P2PTrainError: not root, or ``ip``/``tc`` missing.
    """
    if os.geteuid() != 0:
        raise P2PTrainError(ROOT_MESSAGE)
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise P2PTrainError(f"p2ptrain testbed needs `{tool}` from iproute2; install it (e.g. apt install iproute2)")


def run_cmd(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output.

    Args:
        argv: the command.
        check: raise when it exits non-zero.

    Raises:
        P2PTrainError: the program is missing, hangs, or (with ``check``) fails; the message
            holds the command line and its stderr.
    """
    cmd = " ".join(argv)
    logger.debug("run: %s", cmd)
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise P2PTrainError(f"`{argv[0]}` not found; the testbed needs iproute2 (ip, tc)") from exc
    except subprocess.TimeoutExpired as exc:
        raise P2PTrainError(f"`{cmd}` did not finish in {_CMD_TIMEOUT_S:g} s") from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip() or "(no output)"
        raise P2PTrainError(f"`{cmd}` failed (exit {proc.returncode}): {err}")
    return proc


class Executor:
    """Applies plan steps to the real system; subclass to inject faults in tests."""

    def apply(self, step: Step) -> None:
        """Apply one step.

        Raises:
            P2PTrainError: the command failed or the file could not be written.
        """
        if isinstance(step, Command):
            run_cmd(step.argv)
        elif isinstance(step, MakeDir):
            try:
                os.makedirs(step.path, exist_ok=True)
            except OSError as exc:
                raise P2PTrainError(f"could not create cgroup {step.path}: {exc.strerror}") from exc
        elif isinstance(step, WriteFile):
            if step.optional and not os.path.exists(step.path):
                logger.debug("skip %s (absent on this kernel)", step.path)
                return
            logger.debug("write %r > %s", step.value, step.path)
            try:
                with open(step.path, "w", encoding="ascii") as f:
                    f.write(step.value)
            except OSError as exc:
                raise P2PTrainError(f"could not write {step.value!r} to {step.path}: {exc.strerror}") from exc
        else:  # pragma: no cover - the Step union is closed
            raise TypeError(f"unknown step {step!r}")


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = run_cmd(["ip", "netns", "list"]).stdout
    # Lines look like "p2pt-tb-dev0 (id: 3)" or just "p2pt-tb-dev0".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> set[int]:
    """Pids of the processes inside a named namespace (empty if it does not exist)."""
    proc = run_cmd(["ip", "netns", "pids", netns], check=False)
    if proc.returncode != 0:
        return set()
    return {int(x) for x in proc.stdout.split() if x.isdigit()}


def probe_netem(netns: str) -> bool:
    """Whether this kernel has ``sch_netem`` (added delay/loss), tried on ``lo`` inside ``netns``.

    The probe adds and deletes a netem qdisc on the namespace's loopback, so it touches
    nothing outside the testbed.
    """
    proc = run_cmd(["tc", "-n", netns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], check=False)
    if proc.returncode != 0:
        logger.debug("netem probe: %s", proc.stderr.strip())
        return False
    run_cmd(["tc", "-n", netns, "qdisc", "del", "dev", "lo", "root"], check=False)
    return True
