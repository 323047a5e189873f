"""Start torchrun or the deepspeed launcher on a prepared run dir, and say clearly how it went.

Pure parts: :func:`choose_launcher` and :func:`build_launch` (a :class:`LaunchSpec`: argv + the
environment we add, built with :mod:`shardtrain.launcher.argv`). Effects: :func:`local_devices`
(reads /proc and /dev, never imports torch) and :func:`run` (writes logs, runs the launcher).

How the console stays readable:

- every rank's stdout/stderr goes to a file under ``<run dir>/logs/<launch>/`` (torchrun:
  ``--log_dir --redirects 3`` → ``<id>/attempt_<n>/<local rank>/{stdout,stderr}.log``; deepspeed:
  ``--enable_each_rank_log`` → ``<time>_rank<R>.log``); the launcher's own output goes to
  ``launcher.log`` in the same folder;
- local rank 0's output is copied to the console as it is written (bytes as they are, so the
  progress bar's carriage returns work) — except tracebacks, which are held back;
- when the launcher fails, the first failing rank is found (the rank whose error is not a
  consequence of another rank dying — "Connection closed by peer" and friends — and whose log
  was written first) and its traceback is printed once, then a one-line summary; the exit code
  is non-zero.

Environment added for the workers (see shared/notes/cpu-distributed.md):
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (gloo restarts after a failure work), ``PYTHONUNBUFFERED=1``,
``OMP_NUM_THREADS`` = cores / processes (unless set), and without GPUs ``DS_ACCELERATOR=cpu`` and
``LOCAL_SIZE`` = processes (DeepSpeed's CPU device count).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shardtrain.launcher.argv import (DEFAULT_MODULE, deepspeed_argv, hostfile_text, render_launch_script,
                                      torchrun_argv)

LAUNCHERS = ("torchrun", "deepspeed")
#: 1: rank 0 draws a tqdm progress bar (the console is a terminal); 0: log lines only.
PROGRESS_ENV = "SHARDTRAIN_PROGRESS"
EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 124
TRACEBACK_MARK = b"Traceback (most recent call last):"
#: torch's excepthook prefixes a rank's traceback lines with "[rank1]: "; torchrun --tee with "[default1]:".
RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?", re.M)
_TB_ANY = re.compile(rb"(?:\[(?:rank|default)\d+\]: ?)?Traceback \(most recent call last\):")
_PARTIAL_PREFIX = re.compile(rb"\[(?:r(?:a(?:n(?:k\d*\]?)?)?)?|d(?:e(?:f(?:a(?:u(?:l(?:t\d*\]?)?)?)?)?)?)?)?")


def _header_prefix_len(buf: bytes) -> int:
    """Length of the longest tail of ``buf`` that may still grow into a traceback header (held back)."""
    start = max(0, len(buf) - 80)
    for i in range(start, len(buf)):
        if buf[i] not in b"[T":
            continue
        s = buf[i:]
        m = re.match(rb"\[(?:rank|default)\d+\]: ?", s)
        if m:
            if TRACEBACK_MARK.startswith(s[m.end():]):
                return len(s)
        elif _PARTIAL_PREFIX.fullmatch(s) or TRACEBACK_MARK.startswith(s):
            return len(s)
    return 0
#: Errors a rank raises because ANOTHER rank died (the peer's socket closed): never the root cause.
COLLATERAL = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|connectFullMesh|"
    r"Socket Timeout|Timed out waiting|Interrupted system call|KeyboardInterrupt|SignalException|"
    r"ProcessGroup.*(aborted|shut ?down)|recvBytes|sendBytes|read error|Terminated|received signal",
    re.IGNORECASE)
_ERRORISH = re.compile(r"error|fatal|exception|failed|abort", re.IGNORECASE)
_LOG_NOISE = re.compile(r"^(\[[A-Z]|\[rank|\[default|[WIEF]\d{4} |\[shardtrain\]|\S+ \[(INFO|WARNING|ERROR)\])")


# --------------------------------------------------------------------------- pure: what to run
@dataclass(frozen=True)
class LaunchSpec:
    launcher: str
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


def choose_launcher(flag: str | None, cfg, plan) -> str:
    """--launcher beats run.launcher; "auto" means: deepspeed for ZeRO plans, else torchrun."""
    from shardtrain.compiler.specs import Engine
    for v in (flag, getattr(cfg.run, "launcher", "auto") if cfg is not None else None):
        if v and v != "auto":
            if v not in LAUNCHERS:
                raise ValueError(f"launcher: {v!r} is not one of {', '.join(LAUNCHERS)}")
            return v
    return "deepspeed" if plan.strategy.engine is Engine.DEEPSPEED else "torchrun"


def _rdzv_id(run_dir: Path) -> str:
    return "shardtrain-" + (re.sub(r"[^A-Za-z0-9_.-]", "_", run_dir.name) or "run")


def _splice(argv: list[str], before: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Insert launcher flags just before the '-m MODULE' / '--module MODULE' / script part."""
    for i in range(3, len(argv) - 1):
        if argv[i] in before:
            return argv[:i] + list(extra) + argv[i:]
    raise ValueError(f"cannot find where the worker starts in {argv}")


def build_launch(*, run_dir: str | os.PathLike, launcher: str, nproc_per_node: int, nnodes: int = 1,
                 node_rank: int | None = None, rdzv_endpoint: str | None = None, master_port: int | None = None,
                 max_restarts: int = 0, gpus: int = 0, device: str | None = None, cpu_count: int | None = None,
                 environ: Mapping[str, str] | None = None, module: str = DEFAULT_MODULE,
                 python: str | None = None, log_dir: str | os.PathLike | None = None,
                 progress: bool | None = None, extra_env: Mapping[str, str] | None = None) -> LaunchSpec:
    """The launcher command for a prepared run dir (pure: no process, no file, no environment read
    unless passed in ``environ``). ``device`` defaults to cuda when ``gpus`` > 0, else cpu.
    ``progress``: tell rank 0 to draw a progress bar (``SHARDTRAIN_PROGRESS=1``; its stderr is a log
    file, so it cannot ask isatty() itself) — pass whether the console is a terminal."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher: {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    run_dir = Path(run_dir).absolute()
    device = device or ("cuda" if gpus > 0 else "cpu")
    environ = environ or {}
    python = python or sys.executable
    node_rank_i = 0 if node_rank is None else node_rank
    log_dir = Path(log_dir) if log_dir else run_dir / "logs" / (
        time.strftime("%Y%m%d-%H%M%S") + (f"-node{node_rank_i}" if nnodes > 1 else ""))
    script_args = ["--run-dir", str(run_dir)]
    files: dict[str, str] = {}
    if launcher == "torchrun":
        endpoint = rdzv_endpoint
        if endpoint is None and master_port is not None:
            endpoint = f"127.0.0.1:{master_port}"
        argv = torchrun_argv(nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                             rdzv_endpoint=endpoint, rdzv_id=_rdzv_id(run_dir) if endpoint else None,
                             max_restarts=max_restarts, module=module, script_args=script_args, python=python,
                             log_dir=str(log_dir))
        argv = _splice(argv, ("-m",), ["--redirects", "3"])
    else:
        master_addr = None
        if rdzv_endpoint:
            host, _, port = rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"rdzv_endpoint: {rdzv_endpoint!r} must be HOST:PORT")
            master_addr, master_port = host, master_port if master_port is not None else int(port)
        if max_restarts:
            raise ValueError("max_restarts: the deepspeed launcher does not restart failed workers; use "
                             "--launcher torchrun (it also runs DeepSpeed plans) or drop --max-restarts")
        if nnodes > 1:
            if not master_addr:
                raise ValueError(f"nnodes={nnodes}: give --rdzv-endpoint HOST:PORT (node 0's address) so every "
                                 "node's deepspeed launcher meets there")
            if node_rank is None:
                raise ValueError(f"nnodes={nnodes}: give --node-rank (0 on the first node)")
            hostfile = run_dir / "hostfile"
            # Run on every node with --no_ssh: host names only label the ranks, node 0 is master_addr.
            files[str(hostfile)] = hostfile_text([f"node{i}" for i in range(nnodes)], nproc_per_node)
            argv = deepspeed_argv(num_gpus=nproc_per_node, num_nodes=nnodes, hostfile=str(hostfile),
                                  master_addr=master_addr, master_port=master_port, no_ssh=True,
                                  node_rank=node_rank, module=module, script_args=script_args, python=python)
        else:
            argv = deepspeed_argv(num_gpus=nproc_per_node, master_addr=master_addr, master_port=master_port,
                                  module=module, script_args=script_args, python=python)
        argv = _splice(argv, ("--module",), [f"--enable_each_rank_log={log_dir}"])
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(max(1, (cpu_count or 1) // nproc_per_node))
    if progress is not None:
        env[PROGRESS_ENV] = "1" if progress else "0"
    env.update(extra_env or {})
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["LOCAL_SIZE"] = str(nproc_per_node)
    return LaunchSpec(launcher=launcher, argv=tuple(argv), env=env, run_dir=run_dir, log_dir=log_dir,
                      nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank_i, device=device,
                      files=files)


# --------------------------------------------------------------------------- effects: devices
def count_local_gpus(environ: Mapping[str, str] | None = None) -> int:
    """NVIDIA GPUs this process may use, without importing torch (a driver must be present:
    /proc/driver/nvidia/gpus or /dev/nvidiaN); CUDA_VISIBLE_DEVICES limits the count."""
    environ = os.environ if environ is None else environ
    n = 0
    proc = Path("/proc/driver/nvidia/gpus")
    try:
        n = len(list(proc.iterdir())) if proc.is_dir() else 0
    except OSError:
        n = 0
    if n == 0:
        n = sum(1 for p in Path("/dev").glob("nvidia[0-9]*"))
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [x for x in cvd.split(",") if x.strip() and x.strip() != "-1"]
        n = min(n, len(ids))
    return n


def local_devices(device_pref: str = "auto") -> tuple[int, str]:
    """(usable GPUs, "cuda"|"cpu") for run.device auto|cpu|cuda."""
    if device_pref == "cpu":
        return 0, "cpu"
    n = count_local_gpus()
    if device_pref == "cuda" and n == 0:
        raise ValueError("run.device: cuda, but no NVIDIA GPU is visible here (no /proc/driver/nvidia/gpus, "
                         "or CUDA_VISIBLE_DEVICES hides them); set run.device: auto to train on CPU")
    return n, ("cuda" if n else "cpu")


def ops_env(environ: Mapping[str, str] | None = None, prefix: str | None = None) -> dict[str, str]:
    """TORCH_EXTENSIONS_DIR=<venv>/torch_extensions when it exists and nothing else was chosen: the
    DeepSpeed C++ ops `make test` built for this environment (Makefile) are then found by the workers
    instead of being JIT-compiled again by every rank at once."""
    environ = os.environ if environ is None else environ
    d = Path(prefix or sys.prefix) / "torch_extensions"
    if "TORCH_EXTENSIONS_DIR" not in environ and d.is_dir():
        return {"TORCH_EXTENSIONS_DIR": str(d)}
    return {}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- effects: running
@dataclass(frozen=True)
class RankFailure:
    rank: int
    exitcode: int | None
    exception: str
    """The last line of the traceback, e.g. "ValueError: boom" (or a description)."""
    traceback: str
    log: Path | None
    collateral: bool
    mtime: float
    tail: str = ""
    """Its last output lines, shown when there is no traceback (e.g. sys.exit with a message)."""


@dataclass(frozen=True)
class LaunchResult:
    returncode: int
    summary: str
    wall_s: float
    failure: RankFailure | None = None
    log_dir: Path | None = None


class _Tail(threading.Thread):
    """Copy local rank 0's log files to the console as they grow; hold back tracebacks."""

    def __init__(self, spec: LaunchSpec, out, err, interval: float = 0.1):
        super().__init__(daemon=True)
        self.spec, self.out, self.err, self.interval = spec, out, err, interval
        self._stop_evt = threading.Event()
        self._pos: dict[Path, int] = {}
        self._state: dict[Path, list] = {}  # path -> [pending bytes, at line start, suppressed]
        self._attempt = None

    def _sources(self) -> list[tuple[Path, object]]:
        d = self.spec.log_dir
        if self.spec.launcher == "torchrun":
            attempts = sorted(d.glob("*/attempt_*"), key=lambda p: int(p.name.split("_")[1]))
            if not attempts:
                return []
            a = attempts[-1]
            if self._attempt is not None and a != self._attempt:
                self._write(self.err, f"\n[shardtrain] torchrun restarted the workers ({a.name})\n".encode())
            self._attempt = a
            return [(a / "0" / "stdout.log", self.out), (a / "0" / "stderr.log", self.err)]
        r0 = self.spec.node_rank * self.spec.nproc_per_node
        logs = sorted(d.glob(f"*_rank{r0}.log"))
        return [(logs[-1], self.out)] if logs else []

    @staticmethod
    def _write(stream, data: bytes) -> None:
        try:
            buf = getattr(stream, "buffer", None)
            if buf is not None:
                stream.flush()
                buf.write(data)
                buf.flush()
            else:
                stream.write(data.decode(errors="replace"))
                stream.flush()
        except (ValueError, OSError):
            pass

    def _feed(self, path: Path, stream, data: bytes, final: bool = False) -> None:
        st = self._state.setdefault(path, [b"", False, True])  # [held bytes, traceback seen, at line start]
        if st[1]:
            return
        buf = st[0] + data
        m = _TB_ANY.search(buf)
        if m:  # from here on the failure report speaks (once, for the rank that failed first)
            out = bytearray(buf[:m.start()])
            if (out and not out.endswith(b"\n")) or (not out and not st[2]):
                out += b"\n"  # end a progress bar line
            st[0], st[1] = b"", True
        else:
            hold = 0 if final else _header_prefix_len(buf)
            out, st[0] = buf[:len(buf) - hold], buf[len(buf) - hold:]
        if out:
            st[2] = out.endswith(b"\n")
            self._write(stream, bytes(out))

    def poll(self, final: bool = False) -> None:
        for path, stream in self._sources():
            try:
                with open(path, "rb") as f:
                    f.seek(self._pos.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            if data or final:
                self._pos[path] = self._pos.get(path, 0) + len(data)
                self._feed(path, stream, data, final=final)

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=2)
        self.poll(final=True)


def _extract_traceback(text: str) -> tuple[str, str]:
    """(traceback text from the first 'Traceback' header, its final exception line)."""
    text = RANK_PREFIX.sub("", text)
    i = text.find(TRACEBACK_MARK.decode())
    if i < 0:
        return "", ""
    tb = text[i:].rstrip("\n")
    lines = tb.splitlines()
    exc, end = "", len(lines) - 1
    last_hdr = max(k for k, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)"))
    for k in range(last_hdr + 1, len(lines)):
        ln = lines[k]
        if ln.strip() and not ln.startswith((" ", "\t")):
            exc, end = ln, k  # the first unindented line after the last header is the exception
            break
    # keep a multi-line message, drop what follows it (C++ warnings, other log lines)
    while end + 1 < len(lines) and end - last_hdr < 400 and lines[end + 1].strip() and \
            not _LOG_NOISE.match(lines[end + 1]):
        end += 1
    lines = lines[:end + 1]
    if len(lines) > 120:
        lines = lines[:20] + [f"    ... ({len(lines) - 100} lines omitted; see the log) ..."] + lines[-80:]
    return "\n".join(lines), exc


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _torchrun_exitcodes(launcher_log: str) -> tuple[dict[int, int], int | None]:
    """{rank: exitcode} from torchrun's ChildFailedError report, and its 'root cause' rank."""
    codes, root = {}, None
    for m in re.finditer(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", launcher_log):
        codes[int(m.group(1))] = int(m.group(2))
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+)", launcher_log, re.S)
    if m:
        root = int(m.group(1))
    return codes, root


def _rank_logs(spec: LaunchSpec) -> dict[int, list[Path]]:
    """Global rank → its log files, for the last attempt of this launch."""
    base = spec.node_rank * spec.nproc_per_node
    out: dict[int, list[Path]] = {}
    if spec.launcher == "torchrun":
        attempts = sorted(spec.log_dir.glob("*/attempt_*"), key=lambda p: int(p.name.split("_")[1]))
        if attempts:
            for d in attempts[-1].iterdir():
                if d.is_dir() and d.name.isdigit():
                    out[base + int(d.name)] = [d / "error.json", d / "stderr.log", d / "stdout.log"]
    else:
        for p in sorted(spec.log_dir.glob("*_rank*.log")):
            m = re.search(r"_rank(\d+)\.log$", p.name)
            if m:
                out.setdefault(int(m.group(1)), []).insert(0, p)  # latest prefix first
    return out


def find_first_failure(spec: LaunchSpec, launcher_log: str) -> RankFailure | None:
    """The rank that failed first: not collateral, earliest log write; None if no rank failed."""
    codes, root = _torchrun_exitcodes(launcher_log) if spec.launcher == "torchrun" else ({}, None)
    ds_code = re.search(r"exits with return code = (-?\d+)", launcher_log) if spec.launcher == "deepspeed" else None
    found: list[RankFailure] = []
    for rank, paths in _rank_logs(spec).items():
        tb, exc, log, mtime = "", "", None, 0.0
        for p in paths:
            if not p.is_file():
                continue
            if p.name == "error.json":  # torchelastic @record error file
                try:
                    msg = json.loads(_read(p)).get("message", {})
                    extra = msg.get("extraInfo", {}) if isinstance(msg, dict) else {}
                    tb = extra.get("py_callstack", "") or tb
                    exc = (msg.get("message") if isinstance(msg, dict) else str(msg)) or exc
                except (json.JSONDecodeError, AttributeError):
                    pass
                continue
            t, e = _extract_traceback(_read(p))
            if t and not tb:
                tb, exc, log, mtime = t, e, p, p.stat().st_mtime
            if log is None:
                log, mtime = p, p.stat().st_mtime
        if tb and not exc:
            exc = _extract_traceback(tb)[1]
        lines = [] if tb else [ln for p in paths if p.is_file() and p.suffix == ".log"
                               for ln in RANK_PREFIX.sub("", _read(p)).splitlines() if ln.strip()]
        # torchrun tells exit codes; with the deepspeed launcher a rank without traceback counts when its
        # last words look like an error (e.g. `sys.exit("error: ...")`)
        if not tb and rank not in codes and not (lines and _ERRORISH.search(lines[-1])):
            continue
        code = codes.get(rank)
        tail = ""
        if not tb:
            tail = "\n".join(lines[-15:])
            sig = ""
            if code is not None and code < 0:
                try:
                    sig = signal.Signals(-code).name
                except ValueError:
                    sig = f"signal {-code}"
            exc = (f"killed by {sig}" + (" (out of memory? the kernel OOM killer sends SIGKILL)"
                                          if sig == "SIGKILL" else "")) if sig else (
                (f"exited with code {code}" if code is not None else "exited")
                + (f": {lines[-1].strip()[:200]}" if lines else ""))
        collateral = bool(COLLATERAL.search(exc or "")) or (not tb and code is not None and code < 0
                                                            and rank != root)
        found.append(RankFailure(rank=rank, exitcode=code, exception=exc or "(no exception line)", traceback=tb,
                                 log=log, collateral=collateral, mtime=mtime, tail=tail))
    if not found:
        return None
    found.sort(key=lambda f: (f.collateral, not f.traceback, f.mtime, f.rank))
    first = found[0]
    if ds_code and first.exitcode is None:  # the deepspeed launcher reports the first exit code it saw
        first = dataclasses.replace(first, exitcode=int(ds_code.group(1)))
    return first


def _metrics_summary(run_dir: Path) -> str:
    """'100 steps, loss 6.24 → 2.10' from metrics.jsonl (first and last training loss)."""
    p = run_dir / "metrics.jsonl"
    first = last = None
    steps = None
    try:
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(r, dict):
                continue
            loss = r.get("loss", r.get("train_loss"))
            if loss is not None and r.get("kind", r.get("type", "train")) == "train":
                first = loss if first is None else first
                last = loss
                steps = r.get("step", steps)
    except OSError:
        return ""
    if first is None:
        return ""
    s = f"step {steps}, " if steps is not None else ""
    return f"{s}loss {first:.3f} → {last:.3f}"


def _kill_tree(pid: int, sig: int) -> None:
    try:
        import psutil
        procs = psutil.Process(pid).children(recursive=True)
        procs.append(psutil.Process(pid))
    except Exception:
        procs = []
    for p in procs:
        try:
            p.send_signal(sig)
        except Exception:
            pass


def _set_pdeathsig() -> None:  # runs in the child before exec: die with us (Linux)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def run(spec: LaunchSpec, *, timeout: float | None = None, out=None, err=None) -> LaunchResult:
    """Run the launch; stream rank 0; on failure report the first failing rank once.

    Returns a LaunchResult (returncode 0 ok, 1 a rank failed / the launcher failed, 124 timeout,
    128+N after signal N). SIGINT/SIGTERM are forwarded: the first asks the launcher to stop its
    workers (torchrun sends them the signal and SIGKILLs after 30 s); a second kills the process tree.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    for path, text in spec.files.items():
        Path(path).write_text(text)
    env = {**os.environ, **spec.env}
    launcher_log_path = spec.log_dir / "launcher.log"
    t0 = time.monotonic()
    received: list[int] = []
    with open(launcher_log_path, "wb") as llog:
        llog.write(f"$ {spec.shell()}\n".encode())
        llog.flush()
        proc = subprocess.Popen(list(spec.argv), env=env, stdout=llog, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_set_pdeathsig)
        tail = _Tail(spec, out, err)
        tail.start()

        def forward(signum, _frame):
            received.append(signum)
            if len(received) == 1:
                print(f"\n[shardtrain] {signal.Signals(signum).name}: stopping the workers (again to kill them now)",
                      file=err, flush=True)
                if spec.launcher == "torchrun":
                    _signal_quiet(proc.pid, signum)
                else:  # the deepspeed runner does not forward signals on one node: reach the whole group
                    try:
                        os.killpg(proc.pid, signum)
                    except OSError:
                        pass
            else:
                _kill_tree(proc.pid, signal.SIGKILL)

        old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, forward)
        timed_out = False
        try:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                print(f"\n[shardtrain] timeout after {timeout:.0f} s: stopping the workers", file=err, flush=True)
                _signal_quiet(proc.pid, signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=35)
                except subprocess.TimeoutExpired:
                    _kill_tree(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            tail.stop()
    wall = time.monotonic() - t0
    rel = _rel(spec.log_dir)
    if received:
        name = signal.Signals(received[0]).name
        summary = (f"shardtrain: interrupted by {name} after {wall:.0f} s — workers stopped; run the same command "
                   f"to resume from the latest checkpoint in {_rel(spec.run_dir)}/checkpoints")
        return LaunchResult(128 + received[0], summary, wall, None, spec.log_dir)
    if rc == 0 and not timed_out:
        m = _metrics_summary(spec.run_dir)
        summary = (f"shardtrain: OK — {m + ', ' if m else ''}{spec.nnodes * spec.nproc_per_node} "
                   f"{'CPU' if spec.device == 'cpu' else 'GPU'} ranks via {spec.launcher}, {wall:.0f} s; "
                   f"run dir {_rel(spec.run_dir)}")
        return LaunchResult(EXIT_OK, summary, wall, None, spec.log_dir)
    launcher_log = _read(launcher_log_path)
    from shardtrain.launcher.restart import preempted_result  # exit 75: saved, then stopped (issue 13)
    if not timed_out and (pre := preempted_result(spec, rc, launcher_log, wall)) is not None:
        return pre
    failure = find_first_failure(spec, launcher_log)
    if failure is None:
        tail_lines = [ln for ln in launcher_log.splitlines() if ln.strip()][-25:]
        print("\n[shardtrain] no worker printed a traceback; the launcher's last output "
              f"({rel}/launcher.log, rank logs beside it):\n" + "\n".join("  " + ln for ln in tail_lines),
              file=err, flush=True)
        code = EXIT_TIMEOUT if timed_out else (rc if rc and rc > 0 else EXIT_FAILED)
        what = "timed out" if timed_out else f"{spec.launcher} exited with code {rc}"
        return LaunchResult(code, f"shardtrain: FAILED — {what} after {wall:.0f} s; see {rel}/launcher.log",
                            wall, None, spec.log_dir)
    log = _rel(failure.log) if failure.log else rel
    if failure.collateral:
        print(f"\n[shardtrain] note: no rank reported a root cause; rank {failure.rank}'s error looks like a "
              f"consequence of another process dying (killed? out of memory?). All rank logs: {rel}", file=err)
    if failure.traceback:
        bar = "─" * 72
        print(f"\n{bar}\n[shardtrain] rank {failure.rank} failed first"
              + (f" (exit code {failure.exitcode})" if failure.exitcode is not None else "")
              + f"; its traceback ({log}):\n{bar}\n{failure.traceback}\n{bar}", file=err, flush=True)
    elif failure.tail:
        bar = "─" * 72
        print(f"\n{bar}\n[shardtrain] rank {failure.rank} failed first"
              + (f" (exit code {failure.exitcode})" if failure.exitcode is not None else "")
              + f"; its last output ({log}):\n{bar}\n{failure.tail}\n{bar}", file=err, flush=True)
    code = EXIT_TIMEOUT if timed_out else EXIT_FAILED
    what = "timed out; " if timed_out else ""
    summary = (f"shardtrain: FAILED — {what}rank {failure.rank}: {failure.exception} after {wall:.0f} s; "
               f"logs in {rel}")
    return LaunchResult(code, summary, wall, failure, spec.log_dir)


def _signal_quiet(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _rel(p: Path) -> str:
    try:
        return str(Path(p).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(p)
