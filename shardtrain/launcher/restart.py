"""How a launch ended when it did not simply succeed or fail: pre-emption (every rank saved a checkpoint
and exited with :data:`shardtrain.exitcodes.EXIT_PREEMPTED`) or a non-finite stop (the ranks skipped
train.max_nonfinite_steps steps in a row and exited with :data:`~shardtrain.exitcodes.EXIT_NONFINITE`).
And elastic restarts: torchrun for --max-restarts (also for DeepSpeed plans) and a report of each restart.
Kept out of supervise.py (issue 13); supervise.run calls :func:`stopped_result` before looking for a
failing rank.

Issue 21: a pre-emption or a non-finite stop must not use up --max-restarts. torchrun's elastic agent
restarts the worker group on ANY non-zero exit and counts it (torch/distributed/elastic/agent/server/
api.py, ``_invoke_run``: FAILED -> ``_remaining_restarts -= 1``), with no way to exempt an exit code. So
under --max-restarts the launcher gives the workers a stop-marker file (:func:`stop_marker`,
exitcodes.STOP_MARKER_ENV): a worker that stops deliberately writes its real exit code there and exits
0, torchrun ends the group as finished without a restart, and :func:`stopped_result` returns the real
code (75 or 65). Restarts stay for what they are for: a rank that died.
"""
from __future__ import annotations

import re
from pathlib import Path

from shardtrain import rundir_format as rf
from shardtrain.compiler.specs import Launcher
from shardtrain.exitcodes import EXIT_NONFINITE, EXIT_PREEMPTED
from shardtrain.launcher.failure import (LaunchResult, killed_by, rel, torchrun_attempts, torchrun_exitcodes,
                                         torchrun_rank_logs)


def _latest_step(run_dir: Path) -> int | None:
    from shardtrain.runtime.ckpt_files import newest_complete
    got = newest_complete(run_dir, warn=False)
    return got[0] if got else None


def max_restarts_of(spec) -> int:
    """torchrun's --max_restarts in the launch's argv (0 for the deepspeed launcher, which has none)."""
    argv = list(spec.argv)
    if spec.launcher != Launcher.TORCHRUN or "--max_restarts" not in argv:
        return 0
    try:
        return int(argv[argv.index("--max_restarts") + 1])
    except (IndexError, ValueError):
        return 0


def stop_marker(spec) -> Path | None:
    """The stop-marker file for a launch with restarts (module docstring), else None."""
    return Path(spec.log_dir) / rf.STOP_MARKER if max_restarts_of(spec) > 0 else None


def _summary(spec, code: int, wall: float) -> str:
    step = _latest_step(spec.run_dir)
    ckpts = f"{rel(Path(spec.run_dir))}/{rf.CHECKPOINTS}"
    if code == EXIT_NONFINITE:
        at = f"the last checkpoint (step {step}) is intact" if step is not None else "no checkpoint was written"
        return (f"shardtrain: STOPPED — too many steps in a row had a non-finite loss or gradient norm (train."
                f"max_nonfinite_steps; none of them updated the parameters) after {wall:.0f} s (exit code "
                f"{EXIT_NONFINITE}); {at}. Lower train.lr or check the data, then run the same command to "
                f"resume from {ckpts}")
    at = f"at step {step}" if step is not None else "(no complete checkpoint found)"
    return (f"shardtrain: PREEMPTED — the ranks saved a checkpoint {at} and stopped after {wall:.0f} s "
            f"(exit code {EXIT_PREEMPTED}); run the same command to resume from {ckpts}")


def stopped_result(spec, rc: int, launcher_log: str, wall: float, marker: Path | None = None):
    """A LaunchResult with exit code EXIT_PREEMPTED (the workers stopped on a signal after saving) or
    EXIT_NONFINITE (they stopped on non-finite steps), else None. Read from the stop marker (under
    --max-restarts: the workers exited 0), the deepspeed launcher's exit code (the worker's), or
    torchrun's report of every rank's code."""
    if marker is not None and rc == 0 and marker.is_file():
        try:
            code = int(marker.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            code = EXIT_PREEMPTED
        return LaunchResult(code, _summary(spec, code, wall), wall, None, spec.log_dir)
    codes, root = torchrun_exitcodes(launcher_log)
    for code in (EXIT_PREEMPTED, EXIT_NONFINITE):
        # torchrun stops the whole group when the first rank exits, so ranks still tidying up after the
        # (already complete, collective) decision show SIGTERM/SIGKILL: collateral, not a failure.
        collateral = {code, -15, -9}
        by_torchrun = bool(codes) and code in codes.values() and set(codes.values()) <= collateral \
            and (root is None or codes.get(root) == code)
        if rc == code or by_torchrun:
            return LaunchResult(code, _summary(spec, code, wall), wall, None, spec.log_dir)
    return None



# ------------------------------------------------------------------ elastic restarts (torchrun)
_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
_RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


def launcher_for_restarts(flag: str | None, chosen: Launcher, max_restarts: int) -> Launcher:
    """--max-restarts needs torchrun's elastic agent (the deepspeed launcher never restarts workers);
    torchrun runs DeepSpeed plans too (the worker calls deepspeed.initialize itself)."""
    chosen = Launcher(chosen)
    if not max_restarts or chosen is not Launcher.DEEPSPEED:
        return chosen
    if flag == Launcher.DEEPSPEED:
        raise ValueError("--max-restarts: the deepspeed launcher does not restart failed workers; drop "
                         "--launcher deepspeed (torchrun runs DeepSpeed plans and restarts them) or --max-restarts")
    return Launcher.TORCHRUN


def _exit_text(code: int) -> str:
    return f"killed by {killed_by(code)}" if code < 0 else f"exited with code {code}"


def restart_report(spec, max_restarts: int) -> list[str]:
    """One line per restart torchrun made: which rank died and how, restart i of N, where the restarted
    group resumed (rank 0's "resumed from … at step k" line in that attempt's log)."""
    if spec.launcher != Launcher.TORCHRUN or not max_restarts:
        return []
    log_path = Path(spec.log_dir) / rf.LAUNCHER_LOG
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    failures = _FAILED.findall(text)
    attempts = torchrun_attempts(spec.log_dir)
    lines = []
    for i, a in enumerate(attempts[1:], start=1):
        died = ""
        if i - 1 < len(failures):
            code, local = failures[i - 1]
            died = f"rank {int(local) + spec.node_rank * spec.nproc_per_node} {_exit_text(int(code))}; "
        err = torchrun_rank_logs(a, 0)["stderr"]
        m = _RESUMED.findall(err.read_text(errors="replace")) if err.is_file() else []
        where = f"resumed at step {m[-1]}" if m else "no complete checkpoint: started from step 0"
        lines.append(f"[shardtrain] restart {i} of {max_restarts}: {died}{where}")
    return lines
