"""How a shardtrain process ends: its exit codes, the signal names it accepts, and the environment
variables the launcher or a batch script sets for the workers (defined once).

Pure and tiny (standard library only, no torch, no shardtrain import), so that the runtime, the
launcher, the CLIs and the Slurm renderer all import the same numbers without importing each other.
"""
from __future__ import annotations

import re
import signal

EXIT_OK = 0
#: An error (bad input, a failed launch or rank).
EXIT_ERROR = 1
#: `plan` / `launch` / `emit`: the chosen plan does not fit in memory.
EXIT_NO_FIT = 2
#: A worker (and `shardtrain launch`) that stopped on a signal AFTER saving a complete checkpoint:
#: 75 = EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"): run the same
#: command again to resume. Distinct from success (0), errors (1), "does not fit" (2), the launcher's
#: timeout (124) and killed-by-signal (128+N). Slurm records it as FAILED, ExitCode 75, so a job
#: whose requeue limit is reached never shows COMPLETED.
EXIT_PREEMPTED = 75
#: A worker (and `shardtrain launch`) that stopped because train.max_nonfinite_steps steps IN A ROW had a
#: non-finite loss or gradient norm (none of them updated the parameters; the last checkpoint is intact):
#: 65 = EX_DATAERR of sysexits.h ("the input data was incorrect"): diverged training or bad data; rerunning
#: unchanged would diverge again. Issue 21.
EXIT_NONFINITE = 65
#: `shardtrain verify RUN_DIR`: a checkpoint that claims to be complete is damaged (or none is complete).
EXIT_DAMAGED = 3
#: `shardtrain launch --timeout` ran out (the code coreutils' timeout(1) uses).
EXIT_TIMEOUT = 124

#: "1": rank 0 draws a progress bar although its stderr is a log file (the launcher tails it).
PROGRESS_ENV = "SHARDTRAIN_PROGRESS"
#: cpu / cuda: overrides run.device in the worker.
DEVICE_ENV = "SHARDTRAIN_DEVICE"
#: Set by `shardtrain launch --max-restarts` (launcher/supervise.py): a file path. A worker that stops
#: deliberately (pre-empted: EXIT_PREEMPTED; non-finite steps: EXIT_NONFINITE) writes that code there
#: (local rank 0) and exits 0, because torchrun's elastic agent restarts a worker group on ANY non-zero
#: exit and counts it against --max_restarts (torch/distributed/elastic/agent/server/api.py,
#: _invoke_run); the launcher then returns the code itself (launcher/restart.py). Issue 21.
STOP_MARKER_ENV = "SHARDTRAIN_STOP_MARKER"

#: Set by rendered batch scripts (slurm/script.py), read by runtime/preempt.py: the early-warning
#: signal (``USR2``) and how often rank 0 may requeue the job.
ENV_PREEMPT_SIGNAL = "SHARDTRAIN_PREEMPT_SIGNAL"
ENV_MAX_REQUEUES = "SHARDTRAIN_MAX_REQUEUES"

_NAME = re.compile(r"^SIG[A-Z][A-Z0-9]*$")


def signal_number(name: str | int) -> signal.Signals:
    """``"SIGUSR2"``, ``"USR2"``, ``"usr2"`` or ``12`` -> ``signal.SIGUSR2``; ValueError otherwise."""
    if isinstance(name, int) and not isinstance(name, bool):
        try:
            return signal.Signals(name)
        except ValueError:
            raise ValueError(f"unknown signal {name!r}") from None
    if not isinstance(name, str):
        raise ValueError(f"unknown signal {name!r}")
    text = name.strip().upper()
    if not text.startswith("SIG"):
        text = "SIG" + text
    if not _NAME.match(text):
        raise ValueError(f"invalid signal name {name!r}")
    try:
        return signal.Signals[text]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


def signal_name(name: str | int) -> str:
    """The name without ``SIG``, as sbatch ``--signal`` and bash ``trap`` spell it (``"USR2"``)."""
    return signal_number(name).name[3:]
