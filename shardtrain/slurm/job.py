"""SbatchJob: a frozen, validated description of one batch job (``render`` is in
:mod:`shardtrain.slurm.script`; only :mod:`shardtrain.slurm.submit` runs ``sbatch``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from shardtrain.exitcodes import signal_name
from shardtrain.compiler.specs import Launcher
from shardtrain.launcher.rankstart import PORT_BASE, PORT_SPAN, WORKER_MODULE, parse_launcher

__all__ = ["SbatchJob"]

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def output_default(run_dir: str) -> str:
    """``<run_dir>/slurm-%j.out`` ('%' is a filename-pattern character for sbatch; '%%' a literal '%')."""
    return run_dir.rstrip("/").replace("%", "%%") + "/slurm-%j.out"


@dataclass(frozen=True)
class SbatchJob:
    """One multi-node training job, as data. ``render(job)`` turns it into a batch script."""

    run_dir: str
    """The run directory (``run.yaml``, ``plan.json``, ``checkpoints/``, ``metrics.jsonl``), on a
    file system every node sees; requeued jobs resume from it. A relative path is relative to the
    submission directory (the job's working directory)."""

    nodes: int
    """Number of nodes (``#SBATCH --nodes``); one launcher task runs on each."""

    gpus_per_node: int
    """Worker processes per node (torchrun ``--nproc-per-node``, deepspeed hostfile ``slots``);
    also the GPUs requested per node when ``request_gpus`` is true."""

    launcher: Launcher = Launcher.TORCHRUN
    """``torchrun`` (c10d rendezvous keyed by the job id) or ``deepspeed`` (the deepspeed launcher
    with a hostfile built at run time and ``--no_ssh --node_rank $SLURM_NODEID``)."""

    job_name: str = "shardtrain"
    """``#SBATCH --job-name``."""

    config: Optional[str] = None
    """Run config (YAML) used to prepare the run dir inside the job when ``plan.json`` is missing
    (``shardtrain sbatch`` prepares it at render time; this makes a hand-submitted script work too).
    Relative: to the submission directory."""

    overrides: tuple[str, ...] = ()
    """``key=value`` overrides applied with ``config`` (same meaning as ``--set``)."""

    python: str = "python3"
    """Python interpreter on the compute nodes (an absolute venv path is safest); the launchers
    run as ``python -m torch.distributed.run`` / ``python -m deepspeed.launcher.runner``."""

    partition: Optional[str] = None
    """``#SBATCH --partition``."""

    time: Optional[str] = None
    """``#SBATCH --time`` (e.g. ``04:00:00`` or ``2-00:00:00``); the pre-emption signal is sent
    ``signal_seconds`` before it ends."""

    account: Optional[str] = None
    """``#SBATCH --account``."""

    qos: Optional[str] = None
    """``#SBATCH --qos``."""

    constraint: Optional[str] = None
    """``#SBATCH --constraint`` (node features, e.g. ``h100``)."""

    exclusive: bool = False
    """``#SBATCH --exclusive`` (whole nodes; otherwise set ``cpus_per_task``/``mem``, since one
    task per node with no CPU request gets a single CPU under cgroup confinement)."""

    mem: Optional[str] = None
    """``#SBATCH --mem`` per node (``0`` = all of the node's memory). ``shardtrain sbatch`` sets the
    plan's host RAM per node plus a margin (slurm/resources.py ``mem_per_node``) unless ``--mem``."""

    cpus_per_task: Optional[int] = None
    """``#SBATCH --cpus-per-task`` (the CPUs of the one launcher task per node, shared by its
    workers); also passed to ``srun`` since Slurm 23.11 steps no longer inherit it. ``shardtrain
    sbatch`` sets the CPUs of all local ranks (slurm/resources.py ``cpus_per_task``) unless
    ``--cpus-per-task``."""

    output: Optional[str] = None
    """``#SBATCH --output`` (stdout+stderr, appended across requeues). Default:
    ``<run_dir>/slurm-%j.out``, which needs the run dir to exist at submission (``shardtrain
    sbatch`` creates it); a script that prepares its run dir itself (``config`` set, submitted
    by hand) should log elsewhere, e.g. ``slurm-%x-%j.out`` in the submission directory."""

    request_gpus: bool = True
    """Render ``#SBATCH --gpus-per-node=<gpus_per_node>``; false for CPU-only partitions (and for
    ``run.device: cpu``): the job's ranks then run on CPU/gloo."""

    signal: str = "USR2"
    """Early-warning signal Slurm sends to the job steps ``signal_seconds`` before the time limit
    (USR2 by default: NCCL has swallowed USR1 in some versions). The workers checkpoint on it."""

    signal_seconds: int = 90
    """How many seconds before the time limit ``signal`` is sent (``--signal=SIG@N``; Slurm
    checks time limits about every 30 s, so leave margin for one step plus a checkpoint)."""

    requeue: bool = True
    """``#SBATCH --requeue``: the job may be requeued (by rank 0 after the checkpoint, or on
    preemption)."""

    max_requeues: int = 3
    """Rank 0 requeues only while ``SLURM_RESTART_COUNT`` is below this
    (exported as ``SHARDTRAIN_MAX_REQUEUES``)."""

    port_base: int = PORT_BASE
    """Rendezvous / master port = ``port_base + SLURM_JOB_ID % port_span`` (rankstart's policy)."""

    port_span: int = PORT_SPAN
    """Size of the port range the job id is folded into (keep below the ephemeral range)."""

    env: tuple[tuple[str, str], ...] = ()
    """Extra ``(NAME, value)`` exports, after (and overriding) the common ones."""

    expandable_segments: bool = True
    """The plan's ``hardware.expandable_segments``: export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    (launcher/rankstart.py ``allocator_env``) so the ranks run with the allocator the plan assumed."""

    worker_module: str = WORKER_MODULE
    """Python module each rank runs (``-m``) with ``--run-dir``; tests use a stand-in."""

    user_command: tuple[str, ...] = ()
    """Own-script jobs (``shardtrain sbatch ... -- python train.py ARGS``): the launcher's words for the
    user's command (rankstart.entry_argv: ``train.py ARGS``, ``-m MOD ARGS``, ``--no-python PROG ARGS``),
    run on every rank instead of ``worker_module``; quoted once into a bash array by the script."""

    comment: tuple[str, ...] = ()

    min_nodes: int | None = None
    """Scale-down (issue 21): ``#SBATCH --nodes=MIN-MAX``. A job started or requeued on fewer nodes than
    ``nodes`` re-plans its run dir for them at start (the run-dir check allows it) and the workers resume
    from the portable checkpoint; torchrun gets ``--nnodes MIN:MAX``. torchrun only."""
    """Extra comment lines for the script header (e.g. how to submit it)."""

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise ValueError(f"nodes must be a positive integer, got {self.nodes!r}")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be a positive integer, got {self.gpus_per_node!r}")
        object.__setattr__(self, "launcher", parse_launcher(self.launcher))
        if self.cpus_per_task is not None and (
            not isinstance(self.cpus_per_task, int) or self.cpus_per_task < 1
        ):
            raise ValueError(f"cpus_per_task must be a positive integer, got {self.cpus_per_task!r}")
        if not isinstance(self.signal_seconds, int) or not 0 <= self.signal_seconds <= 65535:
            raise ValueError(f"signal_seconds must be in [0, 65535], got {self.signal_seconds!r}")
        signal_name(self.signal)
        if not isinstance(self.max_requeues, int) or self.max_requeues < 0:
            raise ValueError(f"max_requeues must be >= 0, got {self.max_requeues!r}")
        if not (1024 <= self.port_base and self.port_span >= 1 and self.port_base + self.port_span <= 65536):
            raise ValueError("port_base/port_span must select ports within [1024, 65535]")
        if not isinstance(self.worker_module, str) or not _MODULE.match(self.worker_module):
            raise ValueError(f"worker_module must be a dotted module name, got {self.worker_module!r}")
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError(f"run_dir must be a non-empty path, got {self.run_dir!r}")
        if self.min_nodes is not None:
            if not isinstance(self.min_nodes, int) or not 1 <= self.min_nodes <= self.nodes:
                raise ValueError(f"min_nodes must be in [1, nodes={self.nodes}], got {self.min_nodes!r}")
            if self.min_nodes < self.nodes and self.launcher is not Launcher.TORCHRUN:
                raise ValueError("min_nodes: the deepspeed launcher runs a fixed node count; use the torchrun "
                                 "launcher (it runs DeepSpeed plans too)")
        if self.config is not None and not self.config:
            raise ValueError("config must not be empty")
        texts = {
            "run_dir": self.run_dir,
            "job_name": self.job_name,
            "config": self.config,
            "python": self.python,
            "partition": self.partition,
            "time": self.time,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
            "mem": self.mem,
            "output": self.output,
        }
        for i, o in enumerate(self.overrides):
            texts[f"overrides[{i}]"] = o
        for i, c in enumerate(self.comment):
            texts[f"comment[{i}]"] = c
        for i, w in enumerate(self.user_command):
            texts[f"user_command[{i}]"] = w
        for name, value in self.env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"invalid environment variable name {name!r}")
            texts[f"env[{name}]"] = value
        for key, value in texts.items():
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"{key} must be a string, got {type(value).__name__}")
            if _CONTROL.search(value):
                raise ValueError(f"{key} contains a newline or control character: {value!r}")
        if not self.job_name or not self.python:
            raise ValueError("job_name and python must not be empty")

    def log_path(self, job_id: str) -> str:
        """The ``--output`` file of job ``job_id`` (``%j``, ``%x``, ``%%`` expanded; relative
        paths are relative to the submission directory)."""
        pattern = self.output if self.output is not None else output_default(self.run_dir)
        out, i = [], 0
        while i < len(pattern):
            c = pattern[i]
            if c == "%" and i + 1 < len(pattern):
                nxt = pattern[i + 1]
                rep = {"j": str(job_id), "x": self.job_name, "%": "%"}.get(nxt)
                if rep is not None:
                    out.append(rep)
                    i += 2
                    continue
            out.append(c)
            i += 1
        return "".join(out)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def signal_name(self) -> str:
        """Signal name without the ``SIG`` prefix, as sbatch and ``trap`` spell it."""
        return signal_name(self.signal)
