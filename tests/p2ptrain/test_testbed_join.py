"""`p2ptrain join` inside three emulated devices: discovery crosses the bridge, a ring forms.

Root only (network namespaces); the namespaces, bridge and addresses are created by the
test's testbed and removed after it. With a cluster secret, since the devices' addresses
are not loopback.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from p2ptrain.testbed._testbed import Testbed

from test_testbed_root import _SKIP

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


def test_three_join_nodes_in_three_devices_form_a_ring() -> None:
    cluster = "tb-" + secrets.token_hex(3)
    env = {**os.environ, "P2PTRAIN_SECRET": secrets.token_hex(16), "PYTHONUNBUFFERED": "1"}
    with Testbed.up("uniform", 3, name="j" + secrets.token_hex(2)) as tb:
        procs = [
            d.popen([sys.executable, "-m", "p2ptrain", "join", "--cluster", cluster, "--interface", d.address,
                     "--ephemeral", "--json", "--duration", "30"], stdout=subprocess.PIPE, text=True, env=env)
            for d in tb.devices
        ]
        try:
            views: dict[int, dict] = {}
            deadline = time.monotonic() + 40
            for i, p in enumerate(procs):
                assert p.stdout is not None
                for line in p.stdout:  # each process ends by --duration at the latest
                    ev = json.loads(line)
                    if ev["event"] == "view" and len(ev["members"]) == 3:
                        views[i] = ev
                        break
                    assert time.monotonic() < deadline, "no 3-member view in time"
            assert len(views) == 3, views
            assert len({(tuple(v["members"]), v["epoch"]) for v in views.values()}) == 1, views
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=15)


def test_static_peers_without_mdns_or_interface_form_a_ring_across_devices() -> None:
    """Multicast blocked: nodes bound to all addresses (inside their namespaces) meet via --peer."""
    cluster = "tb-" + secrets.token_hex(3)
    env = {**os.environ, "P2PTRAIN_SECRET": secrets.token_hex(16), "PYTHONUNBUFFERED": "1"}
    with Testbed.up("uniform", 2, name="s" + secrets.token_hex(2)) as tb:
        first, second = tb.devices
        base = [sys.executable, "-m", "p2ptrain", "join", "--cluster", cluster, "--no-mdns", "--ephemeral", "--json",
                "--duration", "30", "--port", "7411"]
        procs = [
            first.popen(base, stdout=subprocess.PIPE, text=True, env=env),
            second.popen(base + ["--peer", f"{first.address}:7411"], stdout=subprocess.PIPE, text=True, env=env),
        ]
        try:
            for p in procs:
                assert p.stdout is not None
                for line in p.stdout:
                    ev = json.loads(line)
                    if ev["event"] == "view" and len(ev["members"]) == 2:
                        break
                else:
                    pytest.fail("a static-peer node never saw a 2-member view")
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=15)
