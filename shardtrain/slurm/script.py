"""``render(job) -> str``: the batch script for an :class:`~shardtrain.slurm.job.SbatchJob` (pure).

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
- The per-node command is :mod:`shardtrain.launcher.rankstart`'s argv (the same builder as
  ``shardtrain launch`` and ``launch.sh``), its run-time values as ``Shell`` words.
- One launcher task per node: ``srun --ntasks-per-node=1 --kill-on-bad-exit=1 --wait=60`` (a dead
  rank ends the job instead of hanging it).
- Head node = first of ``scontrol show hostnames "$SLURM_JOB_NODELIST"`` (read with ``mapfile``:
  ``| head -n 1`` can SIGPIPE scontrol, which ``pipefail`` turns into a failed job); the rendezvous port is derived
  from the job id (rankstart's port policy) so two jobs sharing a node do not collide on 29500.
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

import shlex
from typing import Optional

from shardtrain import rundir_format as rf
from shardtrain.compiler.specs import Launcher
from shardtrain.exitcodes import ENV_MAX_REQUEUES, ENV_PREEMPT_SIGNAL
from shardtrain.launcher import rankstart as rs
from shardtrain.slurm.job import SbatchJob, output_default

__all__ = ["render", "sbatch_options", "COMMON_ENV"]

#: Environment every rendered job exports (sorted when rendered). User ``env`` entries win.
COMMON_ENV: dict[str, str] = {**rs.WORKER_ENV, **rs.CLUSTER_ENV}


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


def _elastic(job: SbatchJob) -> bool:
    """--min-nodes below --nodes: the job may run (or be requeued) on fewer nodes (issue 21)."""
    return job.min_nodes is not None and job.min_nodes < job.nodes


def sbatch_options(job: SbatchJob) -> dict[str, Optional[str]]:
    """``{option: raw value or None for a flag}``, for ``#SBATCH --option=value`` lines."""
    opts: dict[str, Optional[str]] = {
        "job-name": job.job_name,
        "nodes": f"{job.min_nodes}-{job.nodes}" if _elastic(job) else str(job.nodes),
        "ntasks-per-node": "1",
        "open-mode": "append",
        "output": job.output if job.output is not None else output_default(job.run_dir),
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


def launcher_argv(job: SbatchJob) -> list[str]:
    """The per-node launcher command (rankstart's argv). Contains no user text: only integers,
    the validated worker module and Shell words naming variables the batch shell exported; an own-script
    job's command comes as the per-node script's arguments (``"$@"``, from the SHARDTRAIN_COMMAND array)."""
    common = dict(module=job.worker_module, python=rs.Shell("$SHARDTRAIN_PYTHON"),
                  script_args=["--run-dir", rs.Shell("$SHARDTRAIN_RUN_DIR")],
                  entry=rs.Entrypoint(rs.EntryKind.SCRIPT, rs.Shell("$@")) if job.user_command else None)
    if job.launcher is Launcher.TORCHRUN:
        return rs.torchrun_argv(nproc_per_node=job.gpus_per_node, nnodes=job.nodes, min_nnodes=job.min_nodes,
                                rdzv_endpoint=rs.Shell("$SHARDTRAIN_HEAD:$SHARDTRAIN_PORT"),
                                rdzv_id=rs.rdzv_id(rs.Shell("$SLURM_JOB_ID")), **common)
    return rs.deepspeed_argv(num_gpus=job.gpus_per_node, num_nodes=job.nodes,
                             hostfile=rs.Shell("$SHARDTRAIN_HOSTFILE"), master_addr=rs.Shell("$SHARDTRAIN_HEAD"),
                             master_port=rs.Shell("$SHARDTRAIN_PORT"), no_ssh=True,
                             node_rank=rs.Shell("$SLURM_NODEID"), **common)


def _launcher_lines(job: SbatchJob) -> list[str]:
    """The per-node script (run by ``bash -c '...'`` on every node)."""
    sig = job.signal_name
    traps = sig if sig == "TERM" else f"{sig} TERM"
    lines = [
        "# The launcher must outlive the early-warning signal: an ignored signal stays ignored",
        "# across exec, and each worker installs its own handler (checkpoint, then requeue).",
        f'trap "" {traps}',
        'echo "[shardtrain] node $SLURM_NODEID ($(hostname)): starting ' + job.launcher + '"',
        "exec " + rs.format_command(launcher_argv(job)),
    ]
    inner = "\n".join(lines)
    assert "'" not in inner, "the per-node script must not need single quotes"
    return inner.split("\n")


def _node_count_lines(job: SbatchJob, prep: list[str]) -> list[str]:
    """--min-nodes: accept MIN..MAX allocated nodes; when the plan was compiled for another count (a requeue
    on fewer nodes), re-prepare the run dir for the allocation first (issue 21: the run-dir check allows a
    hardware change, the workers resume from the portable checkpoint)."""
    lo, hi, g = job.min_nodes, job.nodes, job.gpus_per_node
    lines = [
        "SHARDTRAIN_NNODES=${#SHARDTRAIN_NODES[@]}",
        f'if [ "$SHARDTRAIN_NNODES" -lt {lo} ] || [ "$SHARDTRAIN_NNODES" -gt {hi} ]; then',
        f'    echo "[shardtrain] expected {lo} to {hi} node(s) in $SLURM_JOB_NODELIST, got $SHARDTRAIN_NNODES" >&2',
        "    exit 1",
        "fi",
        "export SHARDTRAIN_NNODES",
        f'if ! grep -q "^  \\"world_size\\": $(( SHARDTRAIN_NNODES * {g} ))," "$SHARDTRAIN_RUN_DIR/{rf.PLAN_JSON}"; then',
        '    echo "[shardtrain] $SHARDTRAIN_NNODES node(s) allocated: re-planning $SHARDTRAIN_RUN_DIR for them'
        ' (the workers resume from the last checkpoint)"',
    ]
    if not prep:
        return lines + ['    echo "[shardtrain] cannot re-plan without the run config" >&2', "    exit 2", "fi"]
    return lines + ["    " + " \\\n        ".join([*prep, '--set "hardware.nodes=$SHARDTRAIN_NNODES"']), "fi"]


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
        f"# {job.nodes} node(s) x {job.gpus_per_node} process(es), launcher: {job.launcher}, "
        + (f"{job.gpus_per_node} GPU(s) per node (CUDA/nccl)." if job.request_gpus else "no GPU requested (CPU/gloo)."),
        *[f"# {c}".rstrip() for c in job.comment],
        "set -euo pipefail",
        "",
        "# ---- values (quoted once, here; the rest of the script only refers to them) ----",
        f"export SHARDTRAIN_RUN_DIR={_path_word(job.run_dir)}",
        f"export SHARDTRAIN_PYTHON={q(job.python)}",
        f"export {ENV_PREEMPT_SIGNAL}={job.signal_name}",
        f"export {ENV_MAX_REQUEUES}={job.max_requeues if job.requeue else 0}",
    ]
    if job.config is not None:
        out.append(f"SHARDTRAIN_CONFIG={_path_word(job.config)}")
    if job.user_command:  # the user's command, every word quoted once; each node gets it as "$@"
        out.append("SHARDTRAIN_COMMAND=(" + " ".join(q(w) for w in job.user_command) + ")")
    out += ["", "# ---- common environment ----"]
    env = dict(COMMON_ENV)
    env.update(rs.allocator_env(job.expandable_segments))
    env.update(dict(job.env))
    for name in sorted(env):
        out.append(f"export {name}={q(env[name])}")

    sig = job.signal_name
    out += [
        "",
        "# ---- run directory and plan, before any worker starts ----",
        f"trap 'echo \"[shardtrain] batch shell got SIG{sig}; the workers checkpoint\" >&2' {sig}",
        f'if [ ! -f "$SHARDTRAIN_RUN_DIR/{rf.PLAN_JSON}" ]; then',
    ]
    prep: list[str] = []
    if job.config is not None:
        prep = ['"$SHARDTRAIN_PYTHON" -m shardtrain.slurm.cli prepare', '"$SHARDTRAIN_CONFIG"']
        prep += [f"--set {q(o)}" for o in job.overrides]
        # $0: the batch script as Slurm runs it (its spooled copy), recorded as the run dir's command.txt
        prep += ['--run-dir "$SHARDTRAIN_RUN_DIR"', '--command-file "$0"']
        out += [
            '    echo "[shardtrain] preparing $SHARDTRAIN_RUN_DIR from $SHARDTRAIN_CONFIG"',
            "    " + " \\\n        ".join(prep),
        ]
    else:
        out += [
            f'    echo "[shardtrain] $SHARDTRAIN_RUN_DIR/{rf.PLAN_JSON} is missing;'
            ' prepare the run dir first (shardtrain sbatch RUN.yaml)" >&2',
            "    exit 2",
        ]
    out += [
        "fi",
        f'echo "[shardtrain] plan: $SHARDTRAIN_RUN_DIR/{rf.PLAN_JSON}"',
        "grep -E '^  \"(strategy|fits|world_size|micro_batch_size|grad_accum_steps|"
        f"gradient_checkpointing|method|precision)\":' \"$SHARDTRAIN_RUN_DIR/{rf.PLAN_JSON}\" || true",
        "",
        "# ---- head node and rendezvous port (derived from the job id) ----",
        'mapfile -t SHARDTRAIN_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        *(_node_count_lines(job, prep) if _elastic(job) else [
            f'if [ "${{#SHARDTRAIN_NODES[@]}}" -ne {job.nodes} ]; then',
            f'    echo "[shardtrain] expected {job.nodes} node(s) in $SLURM_JOB_NODELIST,'
            ' got ${#SHARDTRAIN_NODES[@]}" >&2',
            "    exit 1",
            "fi"]),
        'SHARDTRAIN_HEAD=${SHARDTRAIN_NODES[0]}',
        f"SHARDTRAIN_PORT={rs.rendezvous_port(rs.Shell('SLURM_JOB_ID'), job.port_base, job.port_span)}",
        "export SHARDTRAIN_HEAD SHARDTRAIN_PORT",
    ]
    if job.launcher is Launcher.DEEPSPEED:
        out += [
            "# deepspeed hostfile, built from the allocation (node order = $SLURM_NODEID order)",
            'export SHARDTRAIN_HOSTFILE="$SHARDTRAIN_RUN_DIR/hostfile.slurm"',
            'for host in "${SHARDTRAIN_NODES[@]}"; do',
            f'    echo "{rs.hostfile_line("$host", job.gpus_per_node)}"',
            'done > "$SHARDTRAIN_HOSTFILE"',
        ]
    out += [
        f'ckpts=$( (ls -A "$SHARDTRAIN_RUN_DIR/{rf.CHECKPOINTS}" 2>/dev/null || true) | wc -l)',
        'echo "[shardtrain] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}:'
        ' nodes $SLURM_JOB_NODELIST, head $SHARDTRAIN_HEAD:$SHARDTRAIN_PORT,'
        ' $ckpts checkpoint entries (the workers resume from the latest)"',
        "",
        "# ---- one launcher per node ----",
    ]
    count = "$SHARDTRAIN_NNODES" if _elastic(job) else str(job.nodes)
    srun = [
        "srun",
        f"--nodes={count}",
        f"--ntasks={count}",
        "--ntasks-per-node=1",
    ]
    if job.cpus_per_task is not None:
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    srun += ["--kill-on-bad-exit=1", "--wait=60", "bash -c '"]
    out.append(" ".join(srun))
    out += _launcher_lines(job)
    out += ["' shardtrain-node \"${SHARDTRAIN_COMMAND[@]}\"" if job.user_command else "'", ""]
    return "\n".join(out)
