"""Run a launch and say clearly how it went: the only place that starts the launcher process.

- every rank's stdout/stderr goes to a file under ``<run dir>/logs/<launch>/`` (torchrun:
  ``--log_dir --redirects 3`` → ``<id>/attempt_<n>/<local rank>/{stdout,stderr}.log``; deepspeed:
  ``--enable_each_rank_log`` → ``<time>_rank<R>.log``); the launcher's own output goes to
  ``launcher.log`` in the same folder;
- local rank 0's output is copied to the console as it is written (:mod:`shardtrain.launcher.logtail`);
- SIGINT/SIGTERM are forwarded to the workers; a second one kills the process tree;
- when the launcher fails, the first failing rank's traceback is printed once
  (:mod:`shardtrain.launcher.failure`), then a one-line summary; the exit code is non-zero.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shardtrain import rundir_format as rf
from shardtrain.compiler.specs import Launcher
from shardtrain.exitcodes import EXIT_ERROR, EXIT_OK, EXIT_TIMEOUT, STOP_MARKER_ENV
from shardtrain.launcher.failure import LaunchResult, find_first_failure, read_text, rel
from shardtrain.launcher.logtail import Tail
from shardtrain.launcher.restart import stop_marker, stopped_result

if TYPE_CHECKING:
    from shardtrain.launcher.rankstart import LaunchSpec


def metrics_summary(run_dir: Path) -> str:
    """'step 100, loss 6.24 → 2.10' from metrics.jsonl (first and last training loss)."""
    first = last = steps = None
    for r in rf.read_metrics(run_dir):
        loss = r.get(rf.LOSS, r.get("train_loss"))
        if loss is not None and rf.is_train(r):
            first = loss if first is None else first
            last = loss
            steps = r.get(rf.STEP, steps)
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
    marker = stop_marker(spec)  # --max-restarts: a deliberate stop must not use up a restart (restart.py)
    if marker is not None:
        marker.unlink(missing_ok=True)
        env[STOP_MARKER_ENV] = str(marker)
    launcher_log_path = spec.log_dir / rf.LAUNCHER_LOG
    t0 = time.monotonic()
    received: list[int] = []
    with open(launcher_log_path, "wb") as llog:
        llog.write(f"$ {spec.shell()}\n".encode())
        llog.flush()
        proc = subprocess.Popen(list(spec.argv), env=env, stdout=llog, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_set_pdeathsig)
        tail = Tail(spec, out, err)
        tail.start()

        def forward(signum, _frame):
            received.append(signum)
            if len(received) == 1:
                print(f"\n[shardtrain] {signal.Signals(signum).name}: stopping the workers (again to kill them now)",
                      file=err, flush=True)
                if spec.launcher == Launcher.TORCHRUN:
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
    logs = rel(spec.log_dir)
    if received:
        name = signal.Signals(received[0]).name
        summary = (f"shardtrain: interrupted by {name} after {wall:.0f} s — workers stopped; run the same command "
                   f"to resume from the latest checkpoint in {rel(spec.run_dir)}/{rf.CHECKPOINTS}")
        return LaunchResult(128 + received[0], summary, wall, None, spec.log_dir)
    if rc == 0 and not timed_out and (stop := stopped_result(spec, rc, "", wall, marker)) is not None:
        return stop  # exit 75 / 65 under --max-restarts: the workers exited 0 and left the code in the marker
    if rc == 0 and not timed_out:
        m = metrics_summary(spec.run_dir)
        summary = (f"shardtrain: OK — {m + ', ' if m else ''}{spec.nnodes * spec.nproc_per_node} "
                   f"{'CPU' if spec.device == 'cpu' else 'GPU'} ranks via {spec.launcher}, {wall:.0f} s; "
                   f"run dir {rel(spec.run_dir)}")
        return LaunchResult(EXIT_OK, summary, wall, None, spec.log_dir)
    launcher_log = read_text(launcher_log_path)
    if not timed_out and (stop := stopped_result(spec, rc, launcher_log, wall)) is not None:
        return stop  # exit 75: every rank saved, then stopped (issue 13); 65: non-finite steps (issue 21)
    return _failed(spec, rc, launcher_log, logs, timed_out, wall, err)


def _failed(spec: LaunchSpec, rc: int, launcher_log: str, logs: str, timed_out: bool, wall: float,
            err) -> LaunchResult:
    """Print the first failing rank's traceback (or last output) once; the FAILED result."""
    failure = find_first_failure(spec, launcher_log)
    if failure is None:
        tail_lines = [ln for ln in launcher_log.splitlines() if ln.strip()][-25:]
        print("\n[shardtrain] no worker printed a traceback; the launcher's last output "
              f"({logs}/{rf.LAUNCHER_LOG}, rank logs beside it):\n" + "\n".join("  " + ln for ln in tail_lines),
              file=err, flush=True)
        code = EXIT_TIMEOUT if timed_out else (rc if rc and rc > 0 else EXIT_ERROR)
        what = "timed out" if timed_out else f"{spec.launcher} exited with code {rc}"
        return LaunchResult(code, f"shardtrain: FAILED — {what} after {wall:.0f} s; see {logs}/{rf.LAUNCHER_LOG}",
                            wall, None, spec.log_dir)
    log = rel(failure.log) if failure.log else logs
    if failure.collateral:
        print(f"\n[shardtrain] note: no rank reported a root cause; rank {failure.rank}'s error looks like a "
              f"consequence of another process dying (killed? out of memory?). All rank logs: {logs}", file=err)
    shown = ("traceback", failure.traceback) if failure.traceback else ("last output", failure.tail)
    if shown[1]:
        bar = "─" * 72
        print(f"\n{bar}\n[shardtrain] rank {failure.rank} failed first"
              + (f" (exit code {failure.exitcode})" if failure.exitcode is not None else "")
              + f"; its {shown[0]} ({log}):\n{bar}\n{shown[1]}\n{bar}", file=err, flush=True)
    code = EXIT_TIMEOUT if timed_out else EXIT_ERROR
    what = "timed out; " if timed_out else ""
    summary = (f"shardtrain: FAILED — {what}rank {failure.rank}: {failure.exception} after {wall:.0f} s; "
               f"logs in {logs}")
    return LaunchResult(code, summary, wall, failure, spec.log_dir)


def _signal_quiet(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass
