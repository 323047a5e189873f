"""How a launch ended when it did not simply succeed or fail: pre-emption (every rank saved a checkpoint
and exited with :data:`shardtrain.exitcodes.EXIT_PREEMPTED`). And elastic restarts: torchrun
for --max-restarts (also for DeepSpeed plans) and a report of each restart. Kept out of supervise.py (issue
13); supervise.run calls :func:`preempted_result` before looking for a failing rank.
"""
from __future__ import annotations

import re
from pathlib import Path

from shardtrain import rundir_format as rf
from shardtrain.compiler.specs import Launcher
from shardtrain.exitcodes import EXIT_PREEMPTED
from shardtrain.launcher.failure import (LaunchResult, killed_by, rel, torchrun_attempts, torchrun_exitcodes,
                                         torchrun_rank_logs)


def _latest_step(run_dir: Path) -> int | None:
    from shardtrain.runtime.ckpt_files import newest_complete
    got = newest_complete(run_dir, warn=False)
    return got[0] if got else None


def preempted_result(spec, rc: int, launcher_log: str, wall: float):
    """A LaunchResult with exit code EXIT_PREEMPTED when the workers stopped on a signal after saving
    (deepspeed launcher: its exit code is the worker's; torchrun: its report lists every rank's code),
    else None."""
    codes, root = torchrun_exitcodes(launcher_log)
    # torchrun stops the whole group when the first rank exits, so ranks still tidying up after the
    # (already complete, collective) save show SIGTERM/SIGKILL: collateral, not a failure.
    collateral = {EXIT_PREEMPTED, -15, -9}
    by_torchrun = bool(codes) and EXIT_PREEMPTED in codes.values() and set(codes.values()) <= collateral \
        and (root is None or codes.get(root) == EXIT_PREEMPTED)
    if rc != EXIT_PREEMPTED and not by_torchrun:
        return None
    step = _latest_step(spec.run_dir)
    at = f"at step {step}" if step is not None else "(no complete checkpoint found)"
    summary = (f"shardtrain: PREEMPTED — the ranks saved a checkpoint {at} and stopped after {wall:.0f} s "
               f"(exit code {EXIT_PREEMPTED}); run the same command to resume from "
               f"{rel(Path(spec.run_dir))}/{rf.CHECKPOINTS}")
    return LaunchResult(EXIT_PREEMPTED, summary, wall, None, spec.log_dir)


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
