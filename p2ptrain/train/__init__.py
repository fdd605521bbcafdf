"""Training over the ring: jobs, data order, data-parallel and pipeline trainers.

Layer: above ``plan``; the top of the library (``bench`` and ``cli`` sit on it).

Files:

- ``_data.py``          the global sample order and near-equal shards (no communication)
- ``_buckets.py``       gradient buckets that go on the wire during the backward pass
- ``_dataparallel.py``  :class:`DataParallelTrainer`: replicas, bucketed all-reduce
- ``_compute.py``       the trainers' compute thread, run nicer than the host's; a process's warm-up
- ``_strategies.py``    which trainer runs a replica-style strategy (data, and those built like it)
- ``_sequence.py``      :class:`SequenceParallelTrainer`: every member a slice of every sequence
- ``_seqattn.py``       sequence parallelism's model side: slice positions, K/V all-gather attention
- ``_tensor.py``        :class:`TensorParallelTrainer`: every member a share of every block's heads
                        and MLP columns (Megatron split + sequence parallelism between)
- ``_tp_shard.py``      tensor parallelism's shard arithmetic: heads, columns, tokens per member
- ``_tp_layers.py``     the split layers and their collectives (f/g, all-gather/reduce-scatter)
- ``_tp_surgery.py``    cutting a model's blocks into a member's share, and putting them back whole
- ``_tp_comm.py``       the tensor-parallel collectives over the ring (direct, from the compute thread)
- ``_tp_reshard.py``    a tensor-parallel member leaving in order: state gathered, the others re-split
- ``_energy.py``        this member's joules per step (meter + radio bytes), its power for the planner
- ``_recovery.py``      going on with the survivors after a member is lost (data parallel)
- ``_state.py``         a member's training state as safetensors blobs, whole or by unit (no pickle)
- ``_store.py``         copies of the state: in memory (snapshots, replicas) and checkpoints on disk
- ``_restore.py``       the members agree a step and put every unit's state together at it
- ``_admit.py``         members that join mid-job are invited in at the next recovery
- ``_serve.py``         answering offers and invitations: one job at a time, a busy member refuses at once
- ``_replan.py``        a pipeline job's planner inputs, re-planned on after a change or on measured compute
- ``_gather.py``        weights back: a pipeline's stages gathered on the submitter at the end
- ``pipeline/``         :class:`PipelineTrainer`: stages, data-parallel groups, schedules
- ``_job.py``           :class:`JobSpec` and entry-point resolution
- ``_preflight.py``     :func:`check_here`: a job checked where it is written, before any ring forms
- ``_single.py``        :func:`train_single`: the single-process reference every strategy matches
- ``_jobs.py``          :class:`JobService`: leaderless job offer/accept and run
"""

from __future__ import annotations

from p2ptrain.train._buckets import GradBuckets, make_buckets
from p2ptrain.train._compute import freeze_startup, warm_process
from p2ptrain.train._data import GlobalSampler, global_batch_indices, shard
from p2ptrain.train._dataparallel import (
    DataParallelTrainer,
    StepMetrics,
    TrainResult,
    param_digest,
)
from p2ptrain.train._energy import wire_bytes
from p2ptrain.train._job import (
    JobSpec,
    parse_model_args,
    resolve,
    workload_entry,
)
from p2ptrain.train._jobs import JobService
from p2ptrain.train._preflight import check_here
from p2ptrain.train._single import train_single
from p2ptrain.train._store import lineage_difference, resume_point
from p2ptrain.train.pipeline import (
    PipelineTrainer,
    Stage,
    even_split,
    layout_from_plan,
)

__all__ = [
    "DataParallelTrainer",
    "GlobalSampler",
    "GradBuckets",
    "JobService",
    "check_here",
    "JobSpec",
    "PipelineTrainer",
    "Stage",
    "StepMetrics",
    "TrainResult",
    "even_split",
    "freeze_startup",
    "global_batch_indices",
    "layout_from_plan",
    "lineage_difference",
    "make_buckets",
    "param_digest",
    "parse_model_args",
    "resolve",
    "resume_point",
    "shard",
    "train_single",
    "warm_process",
    "wire_bytes",
    "workload_entry",
]
