"""How a rank starts, as data: the one owner of the torchrun / deepspeed command line, the workers'
environment and the rendezvous (port policy, rdzv id).

The callers only format what this module builds (the torchx way: a scheduler gets entrypoint + args
and renders them): :mod:`shardtrain.launcher.supervise` runs a :class:`LaunchSpec`,
:mod:`shardtrain.emit.bundle` writes ``launch.sh`` and :mod:`shardtrain.slurm.script` the per-node
command of a batch script. A value the script's shell must expand at run time (``$SLURM_NODEID``) is a
:class:`Shell`: :func:`shell_word` double-quotes it instead of single-quoting it.

Pure: no process, no environment read, no file (:func:`free_port` only asks the kernel for a port).
The per-rank command (:class:`Entrypoint`), shell quoting and the hostfile text are in the
package-private :mod:`shardtrain.launcher._command`, re-exported here. The flags are those of the
installed launchers: ``torch/distributed/run.py`` (torchrun) and ``deepspeed/launcher/runner.py``
(the ``deepspeed`` launcher).
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shardtrain.compiler.specs import Engine, Launcher
from shardtrain.exitcodes import PROGRESS_ENV
# The per-rank command and its shell text live in a package-private helper (size); rankstart re-exports
# them: callers keep importing from here, the one owner of how a rank starts.
from shardtrain.launcher._command import (EntryKind, Entrypoint, Shell, entry_tail, format_command,  # noqa: F401
                                          hostfile_line, hostfile_text, render_launch_script, shell_word)
from shardtrain.launcher._command import word as _w

#: The module every rank runs (``-m`` / ``--module``) with ``--run-dir DIR``.
WORKER_MODULE = "shardtrain.runtime.worker"
#: The launchers that start ranks (``auto`` is a config choice resolved by :func:`choose_launcher`).
LAUNCHERS = tuple(x.value for x in Launcher if x is not Launcher.AUTO)
#: Every launch exports these for its workers.
WORKER_ENV = {"PYTHONUNBUFFERED": "1"}
#: When torchrun may restart workers: otherwise they re-use the agent's rendezvous TCP store, which
#: breaks gloo restarts after a failure (shared/notes/cpu-distributed.md).
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
#: GPU clusters (Slurm jobs): a failed or timed-out NCCL collective aborts the process instead of
#: hanging it.
CLUSTER_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}
#: The CUDA caching allocator setting a plan with ``hardware.expandable_segments`` assumed.
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def allocator_env(expandable_segments: bool) -> dict[str, str]:
    """The environment the plan's reserved-memory figure assumed (compiler/allocator.py): expandable
    segments (fewer fragmentation OOMs; PyTorch's CUDACachingAllocator ``expandable_segments:True``),
    or nothing for the default allocator. Every GPU launch (local, Slurm, launch.sh) exports it, so the
    ranks run with the allocator the plan was made for."""
    return {ALLOC_CONF: "expandable_segments:True"} if expandable_segments else {}
#: Rendezvous / master port = PORT_BASE + key % PORT_SPAN, key = something unique to the job (the CRC
#: of the run dir; the Slurm job id): stable for the job, rarely shared by two jobs on a node, below
#: Linux's ephemeral range (32768+), and not 29500, every launcher's default, often taken on shared hosts.
PORT_BASE, PORT_SPAN = 20000, 10000


def entry_argv(launcher: str | Launcher, entry: Entrypoint) -> list[str]:
    """The words ``launcher`` takes after its own flags to run ``entry`` (a Slurm script passes them to
    every node as ``"$@"``, so the user's words appear once, quoted, in the batch shell)."""
    if parse_launcher(launcher) is Launcher.TORCHRUN:
        return entry_tail(entry, "-m", "--no-python")
    return entry_tail(entry, "--module", "--no_python")


def rendezvous_port(key: int | Shell, base: int = PORT_BASE, span: int = PORT_SPAN) -> int | Shell:
    """The port for ``key``; a Shell key (``Shell("SLURM_JOB_ID")``) gives bash arithmetic."""
    if isinstance(key, Shell):
        return Shell(f"$(( {base} + {key} % {span} ))")
    return base + key % span


def run_dir_key(run_dir: str) -> int:
    return zlib.crc32(run_dir.encode())


def rdzv_id(key: str) -> str:
    """``shardtrain-<run dir name>`` (or ``shardtrain-$SLURM_JOB_ID`` for a Shell key): the same on
    every node of a job, different between jobs."""
    if isinstance(key, Shell):
        return Shell("shardtrain-" + key)
    return "shardtrain-" + (re.sub(r"[^A-Za-z0-9_.-]", "_", key.rstrip("/").rsplit("/", 1)[-1]) or "run")


def parse_launcher(name: str | Launcher) -> Launcher:
    """``"torchrun"`` / ``"deepspeed"`` -> :class:`Launcher`; a one-line ValueError otherwise."""
    if isinstance(name, str) and name in LAUNCHERS:
        return Launcher(name)
    raise ValueError(f"launcher: {name!r} is not one of {', '.join(LAUNCHERS)}")


def choose_launcher(flag: str | None, cfg, plan) -> Launcher:
    """--launcher beats run.launcher (``cfg`` may be None); "auto" means: deepspeed for ZeRO plans,
    else torchrun."""
    for v in (flag, getattr(cfg.run, "launcher", None) if cfg is not None else None):
        if v and v != Launcher.AUTO:
            return parse_launcher(v)
    return Launcher.DEEPSPEED if plan.strategy.engine is Engine.DEEPSPEED else Launcher.TORCHRUN


def _positive(name: str, v: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: {v!r} must be a positive integer")


def _in_range(name: str, v, n: int) -> None:
    if isinstance(v, int) and not 0 <= v < n:
        raise ValueError(f"{name}: {v} must be in [0, {n})")


def torchrun_argv(*, nproc_per_node: int, nnodes: int = 1, node_rank: int | None = None,
                  rdzv_endpoint: str | None = None, rdzv_id: str | None = None, max_restarts: int = 0,
                  module: str = WORKER_MODULE, script_args: Sequence[str] = (), python: str | None = None,
                  log_dir: str | None = None, redirects: int | None = None,
                  entry: Entrypoint | None = None, min_nnodes: int | None = None) -> list[str]:
    """torchrun command line (``entry``: the user's command instead of ``-m module script_args``).

    Single node without ``rdzv_endpoint``: ``--standalone`` (torchrun picks a free port; no
    collisions between jobs sharing a node). Otherwise c10d rendezvous: ``--rdzv_backend c10d
    --rdzv_endpoint HOST:PORT --rdzv_id ID`` (required for ``nnodes > 1``; the same on every node).
    ``node_rank`` is passed when given (c10d assigns ranks itself, but it keeps logs readable).
    ``python`` (e.g. ``sys.executable``) gives ``PYTHON -m torch.distributed.run`` instead of the
    ``torchrun`` console script, so the right virtualenv is used. ``min_nnodes`` < ``nnodes``: elastic
    ``--nnodes MIN:MAX`` (issue 21: a restart after a node is lost for good goes on with the nodes left).
    """
    _positive("nproc_per_node", nproc_per_node)
    _positive("nnodes", nnodes)
    if min_nnodes is not None and not (isinstance(min_nnodes, int) and 1 <= min_nnodes <= nnodes):
        raise ValueError(f"min_nnodes: {min_nnodes!r} must be in [1, {nnodes}] (the most nodes)")
    elastic = min_nnodes is not None and min_nnodes < nnodes
    if nnodes > 1 and (not rdzv_endpoint or not rdzv_id):
        raise ValueError(f"nnodes={nnodes}: multi-node torchrun needs rdzv_endpoint='HOST:PORT' (the "
                         "first node) and a job-unique rdzv_id, identical on every node")
    _in_range("node_rank", node_rank, nnodes)
    if max_restarts < 0:
        raise ValueError(f"max_restarts: {max_restarts} must be >= 0")
    argv = [python, "-m", "torch.distributed.run"] if python else ["torchrun"]
    if nnodes == 1 and not rdzv_endpoint:
        argv += ["--standalone", "--nnodes", "1"]
    else:
        span = f"{min_nnodes}:{nnodes}" if elastic else str(nnodes)
        argv += ["--nnodes", span, "--rdzv_backend", "c10d", "--rdzv_endpoint", _w(rdzv_endpoint)]
        if elastic and node_rank is not None:  # the store must outlive a lost node: node 0 hosts it, always
            argv += ["--rdzv_conf", f"is_host={1 if str(node_rank) == '0' else 0}"]
        if rdzv_id:
            argv += ["--rdzv_id", _w(rdzv_id)]
        if node_rank is not None:
            argv += ["--node_rank", _w(node_rank)]
    argv += ["--nproc_per_node", str(nproc_per_node), "--max_restarts", str(max_restarts)]
    if log_dir:
        argv += ["--log_dir", _w(log_dir)]
    if redirects is not None:  # 3: every rank's stdout and stderr to files under log_dir
        argv += ["--redirects", str(redirects)]
    if entry is not None:
        return argv + entry_tail(entry, "-m", "--no-python")
    return argv + ["-m", module] + [_w(a) for a in script_args]


def deepspeed_argv(*, num_gpus: int, num_nodes: int = 1, hostfile: str | None = None,
                   master_addr: str | None = None, master_port: int | None = None, no_ssh: bool = False,
                   node_rank: int | None = None, module: str = WORKER_MODULE, script_args: Sequence[str] = (),
                   python: str | None = None, each_rank_log: str | None = None,
                   entry: Entrypoint | None = None) -> list[str]:
    """``deepspeed`` launcher command line (flags of deepspeed/launcher/runner.py, 0.19); ``entry``: the
    user's command instead of ``--module module script_args``.

    - ``no_ssh=True`` (run the launcher on every node yourself, e.g. under Slurm srun) requires
      ``node_rank`` and ``master_addr``; the runner asserts ``0 <= node_rank < hosts``.
    - Always ``--no_local_rank``: the runner otherwise appends ``--local_rank=N`` to the worker's
      argv; our worker reads LOCAL_RANK from the environment.
    - ``--module`` makes each rank run ``python -m MODULE``; ``python``: ``PYTHON -m
      deepspeed.launcher.runner`` instead of the ``deepspeed`` script.
    - ``each_rank_log``: a folder for one log file per rank.
    """
    _positive("num_gpus", num_gpus)
    _positive("num_nodes", num_nodes)
    if num_nodes > 1 and not hostfile and not no_ssh:
        raise ValueError(f"num_nodes={num_nodes}: the deepspeed launcher needs hostfile= (see hostfile_text) "
                         "or no_ssh=True with node_rank and master_addr")
    if no_ssh and (node_rank is None or not master_addr):
        raise ValueError("no_ssh: the deepspeed launcher needs node_rank and master_addr with --no_ssh "
                         "(it asserts 0 <= node_rank < number of hosts)")
    _in_range("node_rank", node_rank, num_nodes)
    argv = [python, "-m", "deepspeed.launcher.runner"] if python else ["deepspeed"]
    if hostfile:
        argv += ["--hostfile", _w(hostfile)]
    argv += ["--num_nodes", str(num_nodes), "--num_gpus", str(num_gpus)]
    if master_addr:
        argv += ["--master_addr", _w(master_addr)]
    if master_port is not None:
        argv += ["--master_port", master_port if isinstance(master_port, Shell) else str(int(master_port))]
    if no_ssh:
        argv += ["--no_ssh", "--node_rank", _w(node_rank)]
    argv.append("--no_local_rank")
    if each_rank_log:
        argv.append(f"--enable_each_rank_log={each_rank_log}")
    if entry is not None:
        return argv + entry_tail(entry, "--module", "--no_python")
    return argv + ["--module", module] + [_w(a) for a in script_args]


# --------------------------------------------------------------------------- a local launch
@dataclass(frozen=True)
class LaunchSpec:
    launcher: Launcher
    argv: tuple[str, ...]
    env: dict[str, str]
    """Variables added to the caller's environment (the rest is inherited)."""
    run_dir: Path
    log_dir: Path
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    device: str = "cpu"
    """cpu (gloo) or cuda (nccl)."""
    files: dict[str, str] = field(default_factory=dict)
    """Extra files to write before launching (path → text), e.g. the deepspeed hostfile."""

    def script(self) -> str:
        """command.txt: a bash script that reproduces this launch exactly."""
        where = (f"{self.nnodes} node(s) × {self.nproc_per_node} processes, node rank {self.node_rank}, "
                 f"{'CPU/gloo' if self.device == 'cpu' else 'CUDA/nccl'}")
        return render_launch_script(self.argv, self.env, comment=f"{self.launcher}: {where}")

    def shell(self) -> str:
        """One line: ENV=... argv..."""
        return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env.items()] + [shlex.quote(a) for a in self.argv])

    def describe(self) -> str:
        if self.device == "cpu":
            return (f"no GPU in use: running {self.nproc_per_node} CPU processes on gloo via {self.launcher}"
                    + (f" (node {self.node_rank} of {self.nnodes})" if self.nnodes > 1 else ""))
        return (f"running {self.nproc_per_node} GPU processes on nccl via {self.launcher}"
                + (f" (node {self.node_rank} of {self.nnodes})" if self.nnodes > 1 else ""))


def build_launch(*, run_dir: str | os.PathLike, launcher: str, nproc_per_node: int, nnodes: int = 1,
                 node_rank: int | None = None, rdzv_endpoint: str | None = None, master_port: int | None = None,
                 max_restarts: int = 0, gpus: int = 0, device: str | None = None, cpu_count: int | None = None,
                 environ: Mapping[str, str] | None = None, module: str = WORKER_MODULE,
                 python: str | None = None, log_dir: str | os.PathLike | None = None,
                 progress: bool | None = None, extra_env: Mapping[str, str] | None = None,
                 entry: Entrypoint | None = None, files: Mapping[str, str] | None = None,
                 min_nnodes: int | None = None, expandable_segments: bool = True) -> LaunchSpec:
    """The launcher command for a prepared run dir (pure: no process, no file, no environment read
    unless passed in ``environ``). ``device`` defaults to cuda when ``gpus`` > 0, else cpu.
    ``entry``: every rank runs the user's command (own-script launch) instead of our worker; ``files``:
    run-dir file name -> text written before the launch (LaunchSpec.files).
    ``progress``: tell rank 0 to draw a progress bar (``SHARDTRAIN_PROGRESS=1``; its stderr is a log
    file, so it cannot ask isatty() itself) — pass whether the console is a terminal.
    ``expandable_segments``: the plan's allocator (``allocator_env``), exported on CUDA unless the
    caller's ``environ`` already sets PYTORCH_CUDA_ALLOC_CONF (the user's own setting wins)."""
    launcher = parse_launcher(launcher)
    run_dir = Path(run_dir).absolute()
    device = device or ("cuda" if gpus > 0 else "cpu")
    environ = environ or {}
    python = python or sys.executable
    node_rank_i = 0 if node_rank is None else node_rank
    log_dir = Path(log_dir) if log_dir else run_dir / "logs" / (
        time.strftime("%Y%m%d-%H%M%S") + (f"-node{node_rank_i}" if nnodes > 1 else ""))
    script_args = ["--run-dir", str(run_dir)]
    files = {str(run_dir / name): text for name, text in (files or {}).items()}
    if launcher is Launcher.TORCHRUN:
        endpoint = rdzv_endpoint
        if endpoint is None and master_port is not None:
            endpoint = f"127.0.0.1:{master_port}"
        argv = torchrun_argv(nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                             rdzv_endpoint=endpoint, rdzv_id=rdzv_id(str(run_dir)) if endpoint else None,
                             max_restarts=max_restarts, module=module, script_args=script_args, python=python,
                             log_dir=str(log_dir), redirects=3, entry=entry, min_nnodes=min_nnodes)
    else:
        if min_nnodes is not None and min_nnodes < nnodes:
            raise ValueError("min_nnodes: the deepspeed launcher has no elastic node range outside DeepSpeed's "
                             "elasticity config; use --launcher torchrun (it runs DeepSpeed plans too)")
        master_addr = None
        if rdzv_endpoint:
            host, _, port = rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"rdzv_endpoint: {rdzv_endpoint!r} must be HOST:PORT")
            master_addr, master_port = host, master_port if master_port is not None else int(port)
        if max_restarts:
            raise ValueError("max_restarts: the deepspeed launcher does not restart failed workers; use "
                             "--launcher torchrun (it also runs DeepSpeed plans) or drop --max-restarts")
        multi: dict = {}
        if nnodes > 1:
            if not master_addr:
                raise ValueError(f"nnodes={nnodes}: give --rdzv-endpoint HOST:PORT (node 0's address) so every "
                                 "node's deepspeed launcher meets there")
            if node_rank is None:
                raise ValueError(f"nnodes={nnodes}: give --node-rank (0 on the first node)")
            hostfile = run_dir / "hostfile"
            # Run on every node with --no_ssh: host names only label the ranks, node 0 is master_addr.
            files[str(hostfile)] = hostfile_text([f"node{i}" for i in range(nnodes)], nproc_per_node)
            multi = dict(num_nodes=nnodes, hostfile=str(hostfile), no_ssh=True, node_rank=node_rank)
        argv = deepspeed_argv(num_gpus=nproc_per_node, master_addr=master_addr, master_port=master_port,
                              module=module, script_args=script_args, python=python, each_rank_log=str(log_dir),
                              entry=entry, **multi)
    env = {**WORKER_ENV, **RESTART_ENV}
    if "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(max(1, (cpu_count or 1) // nproc_per_node))
    if progress is not None:
        env[PROGRESS_ENV] = "1" if progress else "0"
    if device != "cpu" and ALLOC_CONF not in environ:
        env.update(allocator_env(expandable_segments))
    env.update(extra_env or {})
    if device == "cpu":  # DeepSpeed's CPU accelerator; LOCAL_SIZE is its device count
        env["DS_ACCELERATOR"] = "cpu"
        env["LOCAL_SIZE"] = str(nproc_per_node)
    return LaunchSpec(launcher=launcher, argv=tuple(argv), env=env, run_dir=run_dir, log_dir=log_dir,
                      nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank_i, device=device,
                      files=files)


def free_port() -> int:
    """A free local TCP port (the kernel's choice), e.g. for a single-node deepspeed master."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
