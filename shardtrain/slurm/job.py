"""SbatchJob (a frozen description of one batch job) and ``render(job) -> str`` (pure).

``render`` is a pure function: the same job always gives the same script, byte for byte; it reads
no environment, no clock and no files. Only :mod:`shardtrain.slurm.submit` runs ``sbatch``.

How the rendered script is built (each point answers a known SLURM pitfall):

- ``#SBATCH`` lines carry literal values (sbatch never expands ``$VAR`` there), sorted by option
  name and quoted with :func:`shlex.quote` (sbatch's own parser honours shell-style quotes; values
  with newlines, backslashes or control characters are rejected up front).
- Every user value used by the script body (run dir, config path, python, overrides, env) is
  assigned once in the batch shell with :func:`shlex.quote` and exported; the per-node command
  (``srun … bash -c '…'``) only refers to those variables inside double quotes, so nothing a user
  wrote is ever parsed as shell code, and per-node values (``$SLURM_NODEID``) are expanded by each
  node, not once by the batch shell.
- One launcher task per node: ``srun --ntasks-per-node=1 --kill-on-bad-exit=1 --wait=60`` (a dead
  rank ends the job instead of hanging it).
- Head node = first of ``scontrol show hostnames "$SLURM_JOB_NODELIST"`` (read with ``mapfile``:
  ``| head -n 1`` can SIGPIPE scontrol, which ``pipefail`` turns into a failed job); the rendezvous port is derived
  from the job id so two jobs sharing a node do not collide on 29500.
- Preemption / time limit: ``--requeue``, ``--open-mode=append`` and ``--signal=SIG@N`` (sent to
  the job steps, i.e. to every process of the launcher step on every node). The launcher (torchrun
  agent or deepspeed runner) is started from ``bash -c 'trap "" SIG TERM; exec …'``: an ignored
  signal stays ignored across ``exec`` so the launcher survives the early warning, while each
  worker's :class:`shardtrain.runtime.preempt.PreemptionHandler` installs a real handler, agrees
  with the other ranks on a step boundary, checkpoints, and rank 0 runs ``scontrol requeue``.
  (torchrun and DeepSpeed's per-node ``launch.py`` install their own SIGTERM handlers, which give
  workers 30 s before SIGKILL; the ignored SIGTERM only keeps the deepspeed *runner*, which has no
  handler in ``--no_ssh`` mode, from dying first.)
- The requeued job resumes from the latest checkpoint in the run dir (the worker does it).
"""

from __future__ import annotations

import re
import shlex
import signal as _signal
from dataclasses import dataclass
from typing import Literal, Optional

__all__ = ["SbatchJob", "render", "sbatch_options", "LAUNCHERS", "COMMON_ENV"]

LAUNCHERS = ("torchrun", "deepspeed")

#: Environment every rendered job exports (sorted when rendered). User ``env`` entries win.
COMMON_ENV: dict[str, str] = {
    "PYTHONUNBUFFERED": "1",
    # Async NCCL error handling: a failed/timed-out collective aborts the process instead of hanging.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    # Fewer fragmentation OOMs (PyTorch CUDA caching allocator).
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}

#: Where the worker module lives (same for both launchers).
WORKER_MODULE = "shardtrain.runtime.worker"

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIGNAL_NAME = re.compile(r"^[A-Z][A-Z0-9]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _signal_number(name: str) -> int:
    """``"USR2"`` or ``"SIGUSR2"`` -> its number; ValueError for unknown names."""
    bare = name[3:] if name.startswith("SIG") else name
    if not _SIGNAL_NAME.match(bare):
        raise ValueError(f"invalid signal name {name!r}")
    try:
        return int(getattr(_signal.Signals, "SIG" + bare))
    except AttributeError:
        raise ValueError(f"unknown signal {name!r}") from None


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

    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
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
    """``#SBATCH --mem`` per node (``0`` = all of the node's memory)."""

    cpus_per_task: Optional[int] = None
    """``#SBATCH --cpus-per-task`` (the CPUs of the one launcher task per node, shared by its
    workers); also passed to ``srun`` since Slurm 23.11 steps no longer inherit it."""

    output: Optional[str] = None
    """``#SBATCH --output`` (stdout+stderr, appended across requeues). Default:
    ``<run_dir>/slurm-%j.out``, which needs the run dir to exist at submission (``shardtrain
    sbatch`` creates it); a script that prepares its run dir itself (``config`` set, submitted
    by hand) should log elsewhere, e.g. ``slurm-%x-%j.out`` in the submission directory."""

    request_gpus: bool = True
    """Render ``#SBATCH --gpus-per-node=<gpus_per_node>``; false for CPU-only partitions."""

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

    port_base: int = 10000
    """Rendezvous / master port = ``port_base + SLURM_JOB_ID % port_span``."""

    port_span: int = 20000
    """Size of the port range the job id is folded into (keep below the ephemeral range)."""

    env: tuple[tuple[str, str], ...] = ()
    """Extra ``(NAME, value)`` exports, after (and overriding) the common ones."""

    worker_module: str = WORKER_MODULE
    """Python module each rank runs (``-m``) with ``--run-dir``; tests use a stand-in."""

    comment: tuple[str, ...] = ()
    """Extra comment lines for the script header (e.g. how to submit it)."""

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise ValueError(f"nodes must be a positive integer, got {self.nodes!r}")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be a positive integer, got {self.gpus_per_node!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.cpus_per_task is not None and (
            not isinstance(self.cpus_per_task, int) or self.cpus_per_task < 1
        ):
            raise ValueError(f"cpus_per_task must be a positive integer, got {self.cpus_per_task!r}")
        if not isinstance(self.signal_seconds, int) or not 0 <= self.signal_seconds <= 65535:
            raise ValueError(f"signal_seconds must be in [0, 65535], got {self.signal_seconds!r}")
        _signal_number(self.signal)
        if not isinstance(self.max_requeues, int) or self.max_requeues < 0:
            raise ValueError(f"max_requeues must be >= 0, got {self.max_requeues!r}")
        if not (1024 <= self.port_base and self.port_span >= 1 and self.port_base + self.port_span <= 65536):
            raise ValueError("port_base/port_span must select ports within [1024, 65535]")
        if not isinstance(self.worker_module, str) or not _MODULE.match(self.worker_module):
            raise ValueError(f"worker_module must be a dotted module name, got {self.worker_module!r}")
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError(f"run_dir must be a non-empty path, got {self.run_dir!r}")
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
        pattern = self.output if self.output is not None else _output_default(self.run_dir)
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
        return _signal.Signals(_signal_number(self.signal)).name[3:]


def _sbatch_value(option: str, value: str) -> str:
    # sbatch parses #SBATCH lines itself: whitespace splits, '…' and "…" quote, an unquoted '#'
    # starts a comment, and a backslash escapes the next character *even inside quotes* (unlike
    # the shell) -- so a backslash cannot be quoted faithfully with shlex; refuse it.
    if "\\" in value:
        raise ValueError(f"#SBATCH --{option} value must not contain a backslash: {value!r}")
    if value == "":
        raise ValueError(f"#SBATCH --{option} value must not be empty")
    return shlex.quote(value)


def _path_word(path: str) -> str:
    """A shell word for ``path``; relative paths are anchored at the job's working directory
    (the submission directory) so that every later use, on every node, is absolute."""
    if path.startswith("/"):
        return shlex.quote(path)
    return '"$PWD"/' + shlex.quote(path)


def _output_default(run_dir: str) -> str:
    # '%' is a filename-pattern character for sbatch; '%%' is a literal '%'.
    return run_dir.rstrip("/").replace("%", "%%") + "/slurm-%j.out"


def sbatch_options(job: SbatchJob) -> dict[str, Optional[str]]:
    """``{option: raw value or None for a flag}``, for ``#SBATCH --option=value`` lines."""
    opts: dict[str, Optional[str]] = {
        "job-name": job.job_name,
        "nodes": str(job.nodes),
        "ntasks-per-node": "1",
        "open-mode": "append",
        "output": job.output if job.output is not None else _output_default(job.run_dir),
        "signal": f"{job.signal_name}@{job.signal_seconds}",
    }
    if job.request_gpus:
        opts["gpus-per-node"] = str(job.gpus_per_node)
    if job.requeue:
        opts["requeue"] = None
    else:
        opts["no-requeue"] = None
    if job.exclusive:
        opts["exclusive"] = None
    if job.cpus_per_task is not None:
        opts["cpus-per-task"] = str(job.cpus_per_task)
    for key, value in (
        ("partition", job.partition),
        ("time", job.time),
        ("account", job.account),
        ("qos", job.qos),
        ("constraint", job.constraint),
        ("mem", job.mem),
    ):
        if value is not None:
            opts[key] = value
    return dict(sorted(opts.items()))


def _launcher_lines(job: SbatchJob) -> list[str]:
    """The per-node command (run by ``bash -c`` on every node). Contains no user text: only
    integers, validated signal names and references to variables exported by the batch shell."""
    sig = job.signal_name
    traps = sig if sig == "TERM" else f"{sig} TERM"
    if job.launcher == "torchrun":
        cmd = [
            'exec "$SHARDTRAIN_PYTHON" -m torch.distributed.run',
            f"--nnodes={job.nodes}",
            f"--nproc-per-node={job.gpus_per_node}",
            '--rdzv-id="$SLURM_JOB_ID"',
            "--rdzv-backend=c10d",
            '--rdzv-endpoint="$SHARDTRAIN_HEAD:$SHARDTRAIN_PORT"',
            "--max-restarts=0",
            f"-m {job.worker_module}",
            '--run-dir "$SHARDTRAIN_RUN_DIR"',
        ]
    else:
        cmd = [
            'exec "$SHARDTRAIN_PYTHON" -m deepspeed.launcher.runner',
            '--hostfile "$SHARDTRAIN_HOSTFILE"',
            "--no_ssh",
            '--node_rank "$SLURM_NODEID"',
            '--master_addr "$SHARDTRAIN_HEAD"',
            '--master_port "$SHARDTRAIN_PORT"',
            "--no_local_rank",
            f"--module {job.worker_module}",
            '--run-dir "$SHARDTRAIN_RUN_DIR"',
        ]
    lines = [
        f"# The launcher must outlive the early-warning signal: an ignored signal stays ignored",
        f"# across exec, and each worker installs its own handler (checkpoint, then requeue).",
        f'trap "" {traps}',
        'echo "[shardtrain] node $SLURM_NODEID ($(hostname)): starting ' + job.launcher + '"',
        " \\\n    ".join(cmd),
    ]
    inner = "\n".join(lines)
    assert "'" not in inner, "the per-node script must not need single quotes"
    return inner.split("\n")


def render(job: SbatchJob) -> str:
    """The complete batch script for ``job`` (a pure function of ``job``)."""
    q = shlex.quote
    out: list[str] = ["#!/bin/bash"]
    for option, value in sbatch_options(job).items():
        if value is None:
            out.append(f"#SBATCH --{option}")
        else:
            out.append(f"#SBATCH --{option}={_sbatch_value(option, value)}")
    out += [
        "#",
        "# Generated by `shardtrain sbatch`; edit the run config and regenerate instead of this file.",
        f"# {job.nodes} node(s) x {job.gpus_per_node} process(es), launcher: {job.launcher}.",
        *[f"# {c}".rstrip() for c in job.comment],
        "set -euo pipefail",
        "",
        "# ---- values (quoted once, here; the rest of the script only refers to them) ----",
        f"export SHARDTRAIN_RUN_DIR={_path_word(job.run_dir)}",
        f"export SHARDTRAIN_PYTHON={q(job.python)}",
        f"export SHARDTRAIN_PREEMPT_SIGNAL={job.signal_name}",
        f"export SHARDTRAIN_MAX_REQUEUES={job.max_requeues if job.requeue else 0}",
    ]
    if job.config is not None:
        out.append(f"SHARDTRAIN_CONFIG={_path_word(job.config)}")
    out += ["", "# ---- common environment ----"]
    env = dict(COMMON_ENV)
    env.update(dict(job.env))
    for name in sorted(env):
        out.append(f"export {name}={q(env[name])}")

    sig = job.signal_name
    out += [
        "",
        "# ---- run directory and plan, before any worker starts ----",
        f"trap 'echo \"[shardtrain] batch shell got SIG{sig}; the workers checkpoint\" >&2' {sig}",
        'if [ ! -f "$SHARDTRAIN_RUN_DIR/plan.json" ]; then',
    ]
    if job.config is not None:
        prep = ['"$SHARDTRAIN_PYTHON" -m shardtrain.slurm.cli prepare', '"$SHARDTRAIN_CONFIG"']
        prep += [f"--set {q(o)}" for o in job.overrides]
        prep += ['--run-dir "$SHARDTRAIN_RUN_DIR"']
        out += [
            '    echo "[shardtrain] preparing $SHARDTRAIN_RUN_DIR from $SHARDTRAIN_CONFIG"',
            "    " + " \\\n        ".join(prep),
        ]
    else:
        out += [
            '    echo "[shardtrain] $SHARDTRAIN_RUN_DIR/plan.json is missing;'
            ' prepare the run dir first (shardtrain sbatch RUN.yaml)" >&2',
            "    exit 2",
        ]
    out += [
        "fi",
        'echo "[shardtrain] plan: $SHARDTRAIN_RUN_DIR/plan.json"',
        "grep -E '^  \"(strategy|fits|world_size|micro_batch_size|grad_accum_steps|"
        "gradient_checkpointing|method|precision)\":' \"$SHARDTRAIN_RUN_DIR/plan.json\" || true",
        "",
        "# ---- head node and rendezvous port (derived from the job id) ----",
        'mapfile -t SHARDTRAIN_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        f'if [ "${{#SHARDTRAIN_NODES[@]}}" -ne {job.nodes} ]; then',
        f'    echo "[shardtrain] expected {job.nodes} node(s) in $SLURM_JOB_NODELIST,'
        ' got ${#SHARDTRAIN_NODES[@]}" >&2',
        "    exit 1",
        "fi",
        'SHARDTRAIN_HEAD=${SHARDTRAIN_NODES[0]}',
        f"SHARDTRAIN_PORT=$(( {job.port_base} + SLURM_JOB_ID % {job.port_span} ))",
        "export SHARDTRAIN_HEAD SHARDTRAIN_PORT",
    ]
    if job.launcher == "deepspeed":
        out += [
            "# deepspeed hostfile, built from the allocation (node order = $SLURM_NODEID order)",
            'export SHARDTRAIN_HOSTFILE="$SHARDTRAIN_RUN_DIR/hostfile.slurm"',
            'for host in "${SHARDTRAIN_NODES[@]}"; do',
            f'    echo "$host slots={job.gpus_per_node}"',
            'done > "$SHARDTRAIN_HOSTFILE"',
        ]
    out += [
        'ckpts=$( (ls -A "$SHARDTRAIN_RUN_DIR/checkpoints" 2>/dev/null || true) | wc -l)',
        'echo "[shardtrain] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}:'
        ' nodes $SLURM_JOB_NODELIST, head $SHARDTRAIN_HEAD:$SHARDTRAIN_PORT,'
        ' $ckpts checkpoint entries (the workers resume from the latest)"',
        "",
        "# ---- one launcher per node ----",
    ]
    srun = [
        "srun",
        f"--nodes={job.nodes}",
        f"--ntasks={job.nodes}",
        "--ntasks-per-node=1",
    ]
    if job.cpus_per_task is not None:
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    srun += ["--kill-on-bad-exit=1", "--wait=60", "bash -c '"]
    out.append(" ".join(srun))
    out += _launcher_lines(job)
    out += ["'", ""]
    return "\n".join(out)
