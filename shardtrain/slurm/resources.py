"""What one node of a batch job asks Slurm for besides GPUs: CPUs and host RAM, from the plan (pure).

Both rendered scripts run ONE launcher task per node (``srun --ntasks-per-node=1``: torchrun's agent
or the deepspeed launcher), which starts every local rank as its child. Whatever the launcher, the
task's ``--cpus-per-task`` is therefore the CPUs of ALL local ranks, and ``--mem`` (per node) their
host RAM together: the plan's ``cpu_memory_per_node_bytes`` (compiler/memory.py
``host_bytes_per_node``: process overhead, offloaded state, model loading).
"""
from __future__ import annotations

import math

from shardtrain.compiler.plan import Plan
from shardtrain.units import GiB, MiB

__all__ = ["CPUS_PER_RANK", "CPU_ADAM_CPUS_PER_NODE", "HOST_RAM_MARGIN", "cpus_per_task", "mem_per_node",
           "host_bytes_per_node"]

CPUS_PER_RANK = 8
"""CPUs per worker process (one per GPU): its main thread, data-loading and tokenizer threads, the
collective library's helper threads and ``OMP_NUM_THREADS`` for CPU ops. 8 fits the common GPU node
shapes (DGX A100: 128 cores / 8 GPUs = 16, DGX H100: 112 / 8 = 14, 4-GPU nodes with 32+ cores) without
asking for more than they have. Override with ``--cpus-per-task``."""

CPU_ADAM_CPUS_PER_NODE = 32
"""Offloaded optimizer (DeepSpeedCPUAdam runs on the host): at least this many CPUs per node, the core
count the cost model's ``HardwareSpec.cpu_adam_params_per_s`` assumes (compiler/specs.py)."""

HOST_RAM_MARGIN = 1.25
"""``--mem`` = planned host RAM per node × this (never above the node's RAM, ``hardware.cpu_memory``):
Slurm's memory limit is a hard cgroup limit, and the plan's host figure is an estimate (the per-process
overhead ``HOST_BYTES_PER_RANK`` is a round number; page cache from reading the dataset and writing
checkpoints is charged to the job's cgroup)."""


def cpus_per_task(plan: Plan) -> int:
    """CPUs of the one launcher task per node = CPUS_PER_RANK × local ranks (at least
    CPU_ADAM_CPUS_PER_NODE when the optimizer runs on the host)."""
    cpus = plan.hardware.gpus_per_node * CPUS_PER_RANK
    if plan.strategy.offloads:
        cpus = max(cpus, CPU_ADAM_CPUS_PER_NODE)
    return cpus


def host_bytes_per_node(plan: Plan, *, on_cpu: bool) -> int:
    """Host RAM the plan needs per node; ``on_cpu``: the ranks run on CPU (no GPU requested, or
    ``run.device: cpu``), so what the plan puts on each "GPU" lives in host RAM too."""
    need = plan.chosen.cpu_memory_per_node_bytes
    if on_cpu:
        need += plan.chosen.per_gpu.total * plan.hardware.gpus_per_node
    return int(need)


def mem_per_node(plan: Plan, *, on_cpu: bool) -> str:
    """``#SBATCH --mem`` value: the planned host RAM per node with HOST_RAM_MARGIN, in whole GiB
    (Slurm's ``G`` and ``M`` suffixes are binary: 1024 MiB, 1024 KiB), in MiB where rounding up
    to GiB would ask for more than the node's RAM."""
    need = host_bytes_per_node(plan, on_cpu=on_cpu)
    ceiling = max(need, plan.hardware.cpu_memory_bytes)  # the margin never asks for more than the node has
    want = min(math.ceil(need * HOST_RAM_MARGIN), ceiling)
    gib = max(1, math.ceil(want / GiB))
    if gib * GiB <= ceiling:
        return f"{gib}G"
    return f"{max(1, math.ceil(want / MiB))}M"
