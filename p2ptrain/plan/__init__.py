"""Planning: measure what each device can do, then decide who runs what.

Layer: above ``ring`` and ``zoo``; pure functions except :func:`agree_on_plan`, which
measures over the ring and all-gathers the figures so every member plans alike.

Files:

- ``_profile.py``   per-layer cost profile of a model on this device
- ``_schedule.py``  pipeline schedules (GPipe, 1F1B) as pure generators
- ``_planner.py``   the cost model and the pipeline / hybrid / uniform planners
- ``_hybrid.py``    the hybrid search: device groupings and layer cuts, branch and bound
- ``_agree.py``     measure speeds, links and latency on a view; agree on one plan
"""

from __future__ import annotations

from p2ptrain.plan._profile import (
    ADAM_STATE_FACTOR,
    LayerCost,
    device_tag,
    model_digest,
    profile_layers,
    profile_layers_cached,
)
from p2ptrain.plan._schedule import (
    SCHEDULES,
    Op,
    gpipe,
    max_in_flight,
    one_f_one_b,
    schedule,
)
from p2ptrain.plan._planner import (
    Device,
    Plan,
    StagePlan,
    bound_samples_per_s,
    format_bytes,
    plan_hybrid,
    plan_pipeline,
    single_device_samples_per_s,
    uniform_plan,
)
from p2ptrain.plan._hybrid import MAX_EXHAUSTIVE_DEVICES, search_hybrid
from p2ptrain.plan._agree import (
    LINK_PROBE_BYTES,
    SPEED_PROBE_S,
    CostModel,
    agree_on_plan,
    measure_link,
)

__all__ = [
    "ADAM_STATE_FACTOR",
    "CostModel",
    "Device",
    "LINK_PROBE_BYTES",
    "LayerCost",
    "MAX_EXHAUSTIVE_DEVICES",
    "Op",
    "Plan",
    "SCHEDULES",
    "SPEED_PROBE_S",
    "StagePlan",
    "agree_on_plan",
    "bound_samples_per_s",
    "device_tag",
    "format_bytes",
    "gpipe",
    "max_in_flight",
    "measure_link",
    "model_digest",
    "one_f_one_b",
    "plan_hybrid",
    "plan_pipeline",
    "profile_layers",
    "profile_layers_cached",
    "schedule",
    "search_hybrid",
    "single_device_samples_per_s",
    "uniform_plan",
]
