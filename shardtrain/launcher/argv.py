"""Launch commands as data: pure argv builders (``list[str]``) and script rendering.

Nothing here runs a process, reads the environment or touches files. The flags are those of the
installed launchers: ``torch/distributed/run.py`` (torchrun) and ``deepspeed/launcher/runner.py``
(the ``deepspeed`` launcher). Shell text is produced only by :func:`render_launch_script`, which
``shlex.quote``-s every word.
"""
from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence

DEFAULT_MODULE = "shardtrain.runtime.worker"
#: torch.distributed.run's own default for --signals-to-handle (torch 2.13); Slurm sends SIGUSR1/2
#: before preemption, which torchrun does NOT forward unless listed here.
TORCHRUN_DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


def _positive(name: str, v: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: {v!r} must be a positive integer")


def torchrun_argv(*, nproc_per_node: int, nnodes: int = 1, node_rank: int | None = None,
                  rdzv_endpoint: str | None = None, rdzv_id: str | None = None, max_restarts: int = 0,
                  module: str | None = DEFAULT_MODULE, script: str | None = None,
                  script_args: Sequence[str] = (), python: str | None = None,
                  signals_to_handle: Sequence[str] | None = None, shutdown_timeout: int | None = None,
                  log_dir: str | None = None) -> list[str]:
    """torchrun command line.

    Single node without ``rdzv_endpoint``: ``--standalone`` (torchrun picks a free port; no
    collisions between jobs sharing a node). Otherwise c10d rendezvous: ``--rdzv_backend c10d
    --rdzv_endpoint HOST:PORT --rdzv_id ID`` (required for ``nnodes > 1``; the same on every node).
    ``node_rank`` is passed when given (c10d assigns ranks itself, but it keeps logs readable).

    ``module`` runs ``-m MODULE`` (default: our worker); ``script=PATH`` runs a script instead.
    ``python`` (e.g. ``sys.executable``) gives ``PYTHON -m torch.distributed.run`` instead of the
    ``torchrun`` console script, so the right virtualenv is used. ``signals_to_handle`` adds
    e.g. ``SIGUSR1`` (Slurm pre-emption warning) to the signals torchrun forwards to workers.
    """
    _positive("nproc_per_node", nproc_per_node)
    _positive("nnodes", nnodes)
    if script is not None:
        module = None  # a script replaces the default module
    if module is None and script is None:
        raise ValueError("torchrun_argv: give module= or script=")
    if nnodes > 1 and (not rdzv_endpoint or not rdzv_id):
        raise ValueError(f"nnodes={nnodes}: multi-node torchrun needs rdzv_endpoint='HOST:PORT' (the "
                         "first node) and a job-unique rdzv_id, identical on every node")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank: {node_rank} must be in [0, {nnodes})")
    if max_restarts < 0:
        raise ValueError(f"max_restarts: {max_restarts} must be >= 0")
    argv = [python, "-m", "torch.distributed.run"] if python else ["torchrun"]
    if nnodes == 1 and not rdzv_endpoint:
        argv += ["--standalone", "--nnodes", "1"]
    else:
        argv += ["--nnodes", str(nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", str(rdzv_endpoint)]
        if rdzv_id:
            argv += ["--rdzv_id", str(rdzv_id)]
        if node_rank is not None:
            argv += ["--node_rank", str(node_rank)]
    argv += ["--nproc_per_node", str(nproc_per_node), "--max_restarts", str(max_restarts)]
    if signals_to_handle:
        argv += ["--signals_to_handle", ",".join(signals_to_handle)]
    if shutdown_timeout is not None:
        argv += ["--shutdown_timeout", str(int(shutdown_timeout))]
    if log_dir:
        argv += ["--log_dir", str(log_dir)]
    argv += ["-m", module] if module else [str(script)]
    return argv + [str(a) for a in script_args]


def deepspeed_argv(*, num_gpus: int | None = None, num_nodes: int = 1, hostfile: str | None = None,
                   master_addr: str | None = None, master_port: int | None = None, no_ssh: bool = False,
                   node_rank: int | None = None, include: str | None = None,
                   module: str | None = DEFAULT_MODULE, script: str | None = None,
                   script_args: Sequence[str] = (), python: str | None = None,
                   no_local_rank: bool = True, launcher: str | None = None) -> list[str]:
    """``deepspeed`` launcher command line (flags of deepspeed/launcher/runner.py, 0.19).

    - ``include`` ("host1@host2:0,2") is mutually exclusive with ``num_gpus``/``num_nodes`` in the
      runner (it raises "Cannot specify num_nodes/gpus with include/exclude"), so either is given.
    - ``no_ssh=True`` (run the launcher on every node yourself, e.g. under Slurm srun) requires
      ``node_rank`` and ``master_addr``; the runner asserts ``0 <= node_rank < hosts``.
    - ``no_local_rank=True`` (default): the runner otherwise appends ``--local_rank=N`` to the
      worker's argv; our worker reads LOCAL_RANK from the environment.
    - ``module``: ``--module`` makes each rank run ``python -m MODULE``.
    - ``python``: ``PYTHON -m deepspeed.launcher.runner`` instead of the ``deepspeed`` script.
    """
    if script is not None:
        module = None  # a script replaces the default module
    if module is None and script is None:
        raise ValueError("deepspeed_argv: give module= or script=")
    if include and num_gpus is not None:
        raise ValueError("include: the deepspeed launcher rejects --include together with --num_gpus/"
                         "--num_nodes ('Cannot specify num_nodes/gpus with include/exclude'); drop one")
    if not include and num_gpus is None:
        raise ValueError("deepspeed_argv: give num_gpus (GPUs per node) or include='host:slots'")
    if num_gpus is not None:
        _positive("num_gpus", num_gpus)
    _positive("num_nodes", num_nodes)
    if num_nodes > 1 and not hostfile and not no_ssh:
        raise ValueError(f"num_nodes={num_nodes}: the deepspeed launcher needs hostfile= (see hostfile_text) "
                         "or no_ssh=True with node_rank and master_addr")
    if no_ssh and (node_rank is None or not master_addr):
        raise ValueError("no_ssh: the deepspeed launcher needs node_rank and master_addr with --no_ssh "
                         "(it asserts 0 <= node_rank < number of hosts)")
    if node_rank is not None and not 0 <= node_rank < num_nodes:
        raise ValueError(f"node_rank: {node_rank} must be in [0, {num_nodes})")
    argv = [python, "-m", "deepspeed.launcher.runner"] if python else ["deepspeed"]
    if hostfile:
        argv += ["--hostfile", str(hostfile)]
    if include:
        argv += ["--include", include]
    else:
        argv += ["--num_nodes", str(num_nodes), "--num_gpus", str(num_gpus)]
    if master_addr:
        argv += ["--master_addr", str(master_addr)]
    if master_port is not None:
        argv += ["--master_port", str(int(master_port))]
    if launcher:
        argv += ["--launcher", launcher]
    if no_ssh:
        argv += ["--no_ssh", "--node_rank", str(node_rank)]
    if no_local_rank:
        argv.append("--no_local_rank")
    argv += ["--module", module] if module else [str(script)]
    return argv + [str(a) for a in script_args]


def hostfile_text(hosts: Iterable[str], slots: int) -> str:
    """MPI-style hostfile for the deepspeed launcher: one ``HOST slots=N`` line per host."""
    _positive("slots", slots)
    hosts = list(hosts)
    if not hosts:
        raise ValueError("hosts: empty; give at least one host name")
    seen = set()
    for h in hosts:
        if not h or any(c.isspace() for c in h) or "=" in h:
            raise ValueError(f"hosts: {h!r} is not a host name")
        if h in seen:  # deepspeed: "Hostfile contains multiple entries for {host}"
            raise ValueError(f"hosts: {h!r} listed twice; the deepspeed launcher rejects duplicates")
        seen.add(h)
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def render_launch_script(argv: Sequence[str], env: Mapping[str, str] | None = None, *,
                         comment: str | None = None) -> str:
    """A bash script that exports ``env`` and execs ``argv``, every value shlex-quoted."""
    if not argv:
        raise ValueError("argv: empty command")
    lines = ["#!/usr/bin/env bash", "# generated by shardtrain; edit the run config, not this file"]
    if comment:
        lines += [f"# {c}" for c in comment.splitlines()]
    lines.append("set -euo pipefail")
    for k, v in (env or {}).items():
        if not k.isidentifier():
            raise ValueError(f"env: {k!r} is not a valid environment variable name")
        lines.append(f"export {k}={shlex.quote(str(v))}")
    groups: list[list[str]] = []
    for i, a in enumerate(argv):  # one line per flag and its value(s)
        if i == 0 or str(a).startswith("-"):
            groups.append([])
        groups[-1].append(shlex.quote(str(a)))
    lines.append("exec " + " \\\n    ".join(" ".join(g) for g in groups) + ' "$@"')
    return "\n".join(lines) + "\n"
