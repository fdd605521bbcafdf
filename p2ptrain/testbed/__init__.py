"""The emulated edge testbed: devices as network namespaces and cgroups (root).

Layer: beside ``train``; uses only the error tree. ``bench`` and ``cli`` drive it.

Files:

- ``_profile.py``   testbed profiles (TOML, shipped in ``profiles/``)
- ``_cgroup.py``    where the cgroups go, how they are emptied and removed
- ``_plan.py``      the testbed plan: names, addresses, ordered steps (no side effects)
- ``_net.py``       the thin adapter that runs ``ip``/``tc`` and applies plan steps
- ``_testbed.py``   :class:`Testbed`: up, run, status, down
"""

from __future__ import annotations

from p2ptrain.testbed._cgroup import (
    CgroupLayout,
    ControllerMount,
    detect_layout,
    group_pids,
    parse_layout,
    remove_groups,
)
from p2ptrain.testbed._net import (
    ROOT_MESSAGE,
    Executor,
    list_netns,
    netns_pids,
    probe_netem,
    require_root,
    run_cmd,
)
from p2ptrain.testbed._plan import (
    DEFAULT_NAME,
    DEFAULT_SUBNET,
    DEVICE_IFACE,
    PREFIX,
    Command,
    DevicePlan,
    MakeDir,
    Step,
    TestbedPlan,
    WriteFile,
    launch_argv,
    plan_testbed,
)
from p2ptrain.testbed._profile import (
    DeviceSpec,
    Profile,
    load_profile,
    parse_profile,
    profile_names,
)
from p2ptrain.testbed._testbed import (
    DEFAULT_STATE_DIR,
    NETEM_MISSING,
    TeardownReport,
    Testbed,
    TestbedDevice,
)

__all__ = [
    "CgroupLayout",
    "Command",
    "ControllerMount",
    "DEFAULT_NAME",
    "DEFAULT_STATE_DIR",
    "DEFAULT_SUBNET",
    "DEVICE_IFACE",
    "DevicePlan",
    "DeviceSpec",
    "Executor",
    "MakeDir",
    "NETEM_MISSING",
    "PREFIX",
    "Profile",
    "ROOT_MESSAGE",
    "Step",
    "TeardownReport",
    "Testbed",
    "TestbedDevice",
    "TestbedPlan",
    "WriteFile",
    "detect_layout",
    "group_pids",
    "launch_argv",
    "list_netns",
    "load_profile",
    "netns_pids",
    "parse_layout",
    "parse_profile",
    "plan_testbed",
    "probe_netem",
    "profile_names",
    "remove_groups",
    "require_root",
    "run_cmd",
]
