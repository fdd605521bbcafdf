"""Planning: measure what each device can do, then decide who runs what.

Layer: above ``ring`` and ``zoo``; pure functions except :func:`agree_on_plan`, which
measures over the ring and all-gathers the figures so every member plans alike.

Files, each importing only those above it:

- ``_profile.py``          per-layer cost profile of a model on this device
- ``_schedule.py``         pipeline schedules (GPipe, 1F1B) as pure generators
- ``_types.py``            what the planner takes and returns: :class:`Device`,
                           :class:`StagePlan`, :class:`Plan`
- ``_cost.py``             the cost model: a stage's compute, transfer, tail and memory;
                           the step time
- ``_pipeline_search.py``  the pure pipeline search: dynamic programming over layer cuts
- ``_hybrid.py``           the hybrid search: device groupings and layer cuts, branch and bound
- ``_planner.py``          the entry points: pipeline / hybrid / uniform planners,
                           throughput bounds
- ``_energy.py``           the subset search: joules per device of a plan, the plan an
                           objective (time or energy, with budgets) picks among the best
                           on every subset of the devices (alone, some left out, all)
- ``_probe.py``            each member's own speed, update, sum and busy hop, probed in
                           interleaved turns among the members of one host
- ``_together.py``         the together pass: the share of its speed a member keeps
                           beside the members of its host, remembered per host setting
- ``_study.py``            pricing data, sequence and tensor parallelism on the same
                           measurements (what ``p2ptrain study`` sets beside its runs)
- ``_auto.py``             ``strategy="auto"``: the planner's plan weighed against
                           sequence and tensor parallelism by the job's objective
- ``_cache.py``            the profile cache: a member's own figures of a model, kept
                           between jobs (key: model structure, micro-batch, device, torch)
- ``_checks.py``           the rule by which a job's measured ratio adds to, strikes or
                           drops a member's cached figures
- ``_agree.py``            measure speeds, links and latency on a view; agree on one plan
- ``_measured.py``         a running layout's measured compute corrects the devices; the
                           layout priced as it runs, beside a new plan
"""

from __future__ import annotations

from p2ptrain.plan._agree import (
    LINK_PROBE_BYTES,
    SPEED_PROBE_S,
    Agreement,
    CostModel,
    agree_on_plan,
    measure_link,
)
from p2ptrain.plan._auto import AUTO_STRATEGIES, StrategyChoice, choose_strategy, speed_shares
from p2ptrain.plan._cache import (
    CHECK_JOBS,
    CHECKED_RANGE,
    CORRECTION_LIMITS,
    PROFILE_CACHE_ENV,
    REPROFILE_ENV,
    CacheEntry,
    LocalProfile,
    ProfileCache,
    default_profile_cache,
    device_fingerprint,
    profile_key,
)
from p2ptrain.plan._energy import OBJECTIVES, choose_plan, plan_for_objective, plan_joules, with_joules
from p2ptrain.plan._hybrid import MAX_EXHAUSTIVE_DEVICES, search_hybrid
from p2ptrain.plan._measured import (
    REPLAN_GAIN,
    STALE_RATIO,
    corrections,
    layout_step_s,
    measured_devices,
    own_ratios,
    predicted_compute,
)
from p2ptrain.plan._planner import (
    bound_samples_per_s,
    plan_hybrid,
    plan_pipeline,
    single_device_samples_per_s,
    uniform_plan,
)
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
from p2ptrain.plan._study import REPLICA_STRATEGIES, StrategyPrice, price_strategy
from p2ptrain.plan._types import Device, DevicePower, Plan, StagePlan, format_bytes

__all__ = [
    "ADAM_STATE_FACTOR",
    "AUTO_STRATEGIES",
    "Agreement",
    "CHECK_JOBS",
    "CORRECTION_LIMITS",
    "CHECKED_RANGE",
    "CacheEntry",
    "CostModel",
    "Device",
    "DevicePower",
    "LINK_PROBE_BYTES",
    "LayerCost",
    "LocalProfile",
    "MAX_EXHAUSTIVE_DEVICES",
    "OBJECTIVES",
    "Op",
    "PROFILE_CACHE_ENV",
    "Plan",
    "ProfileCache",
    "REPLAN_GAIN",
    "REPLICA_STRATEGIES",
    "REPROFILE_ENV",
    "SCHEDULES",
    "SPEED_PROBE_S",
    "STALE_RATIO",
    "StagePlan",
    "StrategyChoice",
    "StrategyPrice",
    "agree_on_plan",
    "bound_samples_per_s",
    "choose_plan",
    "choose_strategy",
    "corrections",
    "default_profile_cache",
    "device_fingerprint",
    "device_tag",
    "format_bytes",
    "gpipe",
    "layout_step_s",
    "max_in_flight",
    "measure_link",
    "measured_devices",
    "model_digest",
    "one_f_one_b",
    "own_ratios",
    "plan_for_objective",
    "plan_hybrid",
    "plan_joules",
    "plan_pipeline",
    "predicted_compute",
    "price_strategy",
    "profile_layers",
    "profile_key",
    "profile_layers_cached",
    "schedule",
    "search_hybrid",
    "single_device_samples_per_s",
    "speed_shares",
    "uniform_plan",
    "with_joules",
]
