"""Failure forensics: after a launch failed, find the rank that failed FIRST and say why, once.

The first failing rank is the one whose error is not a consequence of another rank dying ("Connection
closed by peer" and friends: :data:`COLLATERAL`) and whose log was written first. Sources: the rank
logs of the last attempt (torchrun ``--log_dir --redirects 3``: ``<id>/attempt_<n>/<local rank>/
{stdout,stderr}.log`` and torchelastic's ``error.json``; deepspeed ``--enable_each_rank_log``:
``<time>_rank<R>.log``) and the launcher's own output (torchrun's ChildFailedError report lists
every rank's exit code and the "root cause" rank). Also :class:`LaunchResult`, how a launch ended.
"""
from __future__ import annotations

import dataclasses
import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shardtrain.compiler.specs import Launcher

if TYPE_CHECKING:
    from shardtrain.launcher.rankstart import LaunchSpec

TRACEBACK_MARK = b"Traceback (most recent call last):"
#: torch's excepthook prefixes a rank's traceback lines with "[rank1]: "; torchrun --tee with "[default1]:".
RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?", re.M)
#: Errors a rank raises because ANOTHER rank died (the peer's socket closed): never the root cause.
COLLATERAL = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|connectFullMesh|"
    r"Socket Timeout|Timed out waiting|Interrupted system call|KeyboardInterrupt|SignalException|"
    r"ProcessGroup.*(aborted|shut ?down)|recvBytes|sendBytes|read error|Terminated|received signal",
    re.IGNORECASE)
_ERRORISH = re.compile(r"error|fatal|exception|failed|abort", re.IGNORECASE)
_LOG_NOISE = re.compile(r"^(\[[A-Z]|\[rank|\[default|[WIEF]\d{4} |\[shardtrain\]|\S+ \[(INFO|WARNING|ERROR)\])")


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
    """How a launch ended: the exit code `shardtrain launch` returns and its one-line summary."""
    returncode: int
    summary: str
    wall_s: float
    failure: RankFailure | None = None
    log_dir: Path | None = None


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


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def torchrun_attempts(log_dir: Path) -> list[Path]:
    """torchrun's per-attempt log folders (``<id>/attempt_<n>``), oldest first: one per (re)start."""
    return sorted(Path(log_dir).glob("*/attempt_*"), key=lambda p: int(p.name.split("_")[1]))


def torchrun_rank_logs(attempt: Path, local_rank: int) -> dict[str, Path]:
    """One local rank's files in a torchrun attempt folder (``--log_dir`` with ``--redirects 3``):
    ``<attempt>/<local rank>/{stdout.log, stderr.log, error.json}`` (torch/distributed/elastic/
    multiprocessing/api.py)."""
    d = attempt / str(local_rank)
    return {"stdout": d / "stdout.log", "stderr": d / "stderr.log", "error": d / "error.json"}


def killed_by(code: int | None) -> str:
    """The signal name for a negative exit code (a worker killed by a signal), "" otherwise."""
    if code is None or code >= 0:
        return ""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def torchrun_exitcodes(launcher_log: str) -> tuple[dict[int, int], int | None]:
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
    if spec.launcher == Launcher.TORCHRUN:
        attempts = torchrun_attempts(spec.log_dir)
        if attempts:
            for d in attempts[-1].iterdir():
                if d.is_dir() and d.name.isdigit():
                    logs = torchrun_rank_logs(attempts[-1], int(d.name))
                    out[base + int(d.name)] = [logs["error"], logs["stderr"], logs["stdout"]]
    else:
        for p in sorted(spec.log_dir.glob("*_rank*.log")):
            m = re.search(r"_rank(\d+)\.log$", p.name)
            if m:
                out.setdefault(int(m.group(1)), []).insert(0, p)  # latest prefix first
    return out


def find_first_failure(spec: LaunchSpec, launcher_log: str) -> RankFailure | None:
    """The rank that failed first: not collateral, earliest log write; None if no rank failed."""
    codes, root = torchrun_exitcodes(launcher_log) if spec.launcher == Launcher.TORCHRUN else ({}, None)
    ds_code = (re.search(r"exits with return code = (-?\d+)", launcher_log)
               if spec.launcher == Launcher.DEEPSPEED else None)
    found: list[RankFailure] = []
    for rank, paths in _rank_logs(spec).items():
        tb, exc, log, mtime = "", "", None, 0.0
        for p in paths:
            if not p.is_file():
                continue
            if p.name == "error.json":  # torchelastic @record error file
                try:
                    msg = json.loads(read_text(p)).get("message", {})
                    extra = msg.get("extraInfo", {}) if isinstance(msg, dict) else {}
                    tb = extra.get("py_callstack", "") or tb
                    exc = (msg.get("message") if isinstance(msg, dict) else str(msg)) or exc
                except (json.JSONDecodeError, AttributeError):
                    pass
                continue
            t, e = _extract_traceback(read_text(p))
            if t and not tb:
                tb, exc, log, mtime = t, e, p, p.stat().st_mtime
            if log is None:
                log, mtime = p, p.stat().st_mtime
        if tb and not exc:
            exc = _extract_traceback(tb)[1]
        lines = [] if tb else [ln for p in paths if p.is_file() and p.suffix == ".log"
                               for ln in RANK_PREFIX.sub("", read_text(p)).splitlines() if ln.strip()]
        # torchrun tells exit codes; with the deepspeed launcher a rank without traceback counts when its
        # last words look like an error (e.g. `sys.exit("error: ...")`)
        if not tb and rank not in codes and not (lines and _ERRORISH.search(lines[-1])):
            continue
        code = codes.get(rank)
        tail = ""
        if not tb:
            tail = "\n".join(lines[-15:])
            sig = killed_by(code)
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


def rel(p: Path) -> str:
    """``p`` relative to the working directory when it is below it (shorter console lines)."""
    try:
        return str(Path(p).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(p)
