"""The ``--dashboard`` and ``--tensorboard`` flags, shared by ``join``, ``demo`` and ``train``.

The commands stay thin: :func:`add_arguments` adds the flags, :func:`check_arguments`
refuses bad ones before any network activity, and :func:`start_watching` starts what
they ask for beside the node, returning a :class:`Watch` to close at the end.

Every member started from the command line runs the ring share
(:class:`~p2ptrain.dashboard.StatusShare`) even without ``--dashboard``: it sends
nothing until a member serving a page asks, so any member's page shows them all.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2ptrain._errors import ConfigError
from p2ptrain.dashboard._guard import is_loopback, parse_address
from p2ptrain.dashboard._server import Dashboard, require_aiohttp
from p2ptrain.dashboard._share import StatusShare
from p2ptrain.dashboard._tensorboard import TensorBoardLog, require_tensorboard
from p2ptrain.ring import Node

__all__ = ["Watch", "add_arguments", "check_arguments", "start_watching"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--dashboard [ADDR:]PORT`` and ``--tensorboard DIR`` to a command's parser."""
    parser.add_argument(
        "--dashboard", metavar="[ADDR:]PORT",
        help="serve a live page of the whole ring at this address (a bare port binds 127.0.0.1; port 0 picks a free "
             "one, printed at start); any other address needs the cluster secret and the page then asks for the "
             "token printed at start. Needs pip install 'p2ptrain[dashboard]'",
    )
    parser.add_argument(
        "--tensorboard", metavar="DIR",
        help="also write each step's metrics here as TensorBoard event files (pip install 'p2ptrain[tensorboard]')",
    )


def check_arguments(args: argparse.Namespace, secret: bytes | None, *, has_secret: bool = True) -> None:
    """Refuse the flags before anything starts.

    Args:
        has_secret: the command takes a cluster secret (``demo`` does not).

    Raises:
        ConfigError: a bad address, a non-loopback address without a secret, or a
            missing extra (the message names the pip command).
    """
    if getattr(args, "dashboard", None):
        host, _ = parse_address(args.dashboard)
        if not is_loopback(host) and not secret:
            how = ("(--secret-file F or $P2PTRAIN_SECRET), from which the page's token is derived" if has_secret else
                   "(from which the page's token is derived), and this command's members have none")
            raise ConfigError(f"--dashboard {args.dashboard} binds {host}, which is not loopback: that needs the cluster "
                              f"secret {how}; or use --dashboard 127.0.0.1:PORT")
        require_aiohttp()
    if getattr(args, "tensorboard", None):
        require_tensorboard()
        # A file or an unwritable place was a tensorboardX traceback after the ring and the plan.
        where = Path(args.tensorboard)
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = "it is a file" if where.is_file() else exc.strerror or exc
            raise ConfigError(f"--tensorboard {where}: cannot make that folder: {why}") from None
        if not os.access(where, os.W_OK):
            raise ConfigError(f"--tensorboard {where}: this user cannot write there")


class Watch:
    """What :func:`start_watching` started: the share, and the page and event files if asked."""

    def __init__(self, share: StatusShare, dashboard: Dashboard | None, tensorboard: TensorBoardLog | None) -> None:
        self.share, self.dashboard, self.tensorboard = share, dashboard, tensorboard

    def describe(self, *, as_json: bool = False) -> list[str]:
        """The lines a command prints about the page: its URL, and the token where one is needed."""
        d = self.dashboard
        if d is None:
            return []
        if as_json:
            return [json.dumps({"event": "dashboard", "url": d.url, "port": d.port, "token": d.token})]
        lines = [f"dashboard: {d.url}"]
        if d.token is not None:
            lines.append(f"dashboard token: {d.token}  (the page asks for it; or open {d.url}#token={d.token})")
        return lines

    async def close(self) -> None:
        """Stop the page, the share and the event files. Idempotent."""
        if self.dashboard is not None:
            await self.dashboard.close()
        await self.share.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


async def start_watching(node: Node, jobs: Any, args: argparse.Namespace, secret: bytes | None, *,
                         say: Callable[[str], Any] | None = None, as_json: bool = False) -> Watch:
    """Start the ring share, and the dashboard and TensorBoard files when ``args`` ask for them.

    Args:
        node: the command's started node.
        jobs: its :class:`p2ptrain.JobService` (hooks chained; create it first).
        args: parsed with :func:`add_arguments`.
        secret: the cluster secret, if any.
        say: prints the page's lines (:meth:`Watch.describe`).
    """
    share = StatusShare(node, jobs)
    await share.start()
    dashboard = tensorboard = None
    try:
        if getattr(args, "tensorboard", None):
            tensorboard = TensorBoardLog(args.tensorboard).attach(jobs)
        if getattr(args, "dashboard", None):
            dashboard = Dashboard(node, address=args.dashboard, secret=secret, share=share)
            await dashboard.start()
    except BaseException:
        await Watch(share, dashboard, tensorboard).close()
        raise
    watch = Watch(share, dashboard, tensorboard)
    if say is not None:
        for line in watch.describe(as_json=as_json):
            say(line)
    return watch
