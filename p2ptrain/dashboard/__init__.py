"""The live dashboard: one read-only web page for the whole ring, served by any member.

Layer: above ``train`` (it reads the job service's step metrics and plans), below
``cli``. aiohttp (the ``dashboard`` extra) and tensorboardX (the ``tensorboard`` extra)
are imported only when a page or event files are asked for.

::

    async with p2ptrain.Node(cluster="lab") as node:
        jobs = p2ptrain.JobService(node)
        async with p2ptrain.Dashboard(node, jobs, address="127.0.0.1:8080") as dash:
            print(dash.url)
            await jobs.serve()

Files:

- ``_report.py``       the ``dash.status`` report members send each other: fields,
                       bounds, the checks on receipt
- ``_state.py``        :class:`RingStatus`: the plain model of the ring the page shows
                       (members, job, plan, loss, timeline, view changes); no sockets
- ``_share.py``        :class:`StatusShare`: the ring messages (``dash.want`` /
                       ``dash.status``), one a second to members that asked
- ``_guard.py``        addresses, the token derived from the cluster secret, the
                       per-client rate limit, the Host check
- ``_server.py``       :class:`Dashboard`: the aiohttp server, Server-Sent Events, limits
- ``_tensorboard.py``  :class:`TensorBoardLog`: step metrics as TensorBoard event files
- ``_options.py``      the ``--dashboard`` / ``--tensorboard`` flags of the commands
- ``static/``          the page: ``index.html``, ``app.js`` (SVG charts drawn by the page),
                       ``style.css``; shipped in the package, nothing from a CDN

How it looks and what it shows: docs/dashboard.md.
"""

from __future__ import annotations

from p2ptrain.dashboard._guard import RateLimiter, dashboard_token, parse_address
from p2ptrain.dashboard._options import Watch, add_arguments, check_arguments, start_watching
from p2ptrain.dashboard._report import MAX_REPORT_BYTES, JobInfo, PlanInfo, Report
from p2ptrain.dashboard._server import Dashboard, require_aiohttp
from p2ptrain.dashboard._share import StatusShare, chain_hook
from p2ptrain.dashboard._state import RingStatus
from p2ptrain.dashboard._tensorboard import TensorBoardLog, require_tensorboard

__all__ = [
    "MAX_REPORT_BYTES",
    "Dashboard",
    "JobInfo",
    "PlanInfo",
    "RateLimiter",
    "Report",
    "RingStatus",
    "StatusShare",
    "TensorBoardLog",
    "Watch",
    "add_arguments",
    "chain_hook",
    "check_arguments",
    "dashboard_token",
    "parse_address",
    "require_aiohttp",
    "require_tensorboard",
    "start_watching",
]
