"""Pre-emption / time-limit handling inside each rank.

Signal path under Slurm (see :mod:`shardtrain.slurm.script`): ``#SBATCH --signal=USR2@N`` makes Slurm
send SIGUSR2 to every process of the job steps on every node N seconds before the time limit (a
pre-empting scheduler or ``scancel`` sends SIGTERM). The launchers (torchrun agent, deepspeed
runner) were started with the signal ignored, so they survive; each worker calls
:meth:`PreemptionHandler.install`, whose handler only sets a flag. At every optimizer-step
boundary all ranks call :meth:`PreemptionHandler.should_stop` (an all-reduce of the flag), so they
agree on the same step; they save a checkpoint, meet at a barrier, and rank 0 calls
:meth:`PreemptionHandler.requeue` (``scontrol requeue $SLURM_JOB_ID`` while
``SLURM_RESTART_COUNT`` is below the limit). The requeued job resumes from that checkpoint.

Typical use in a training loop::

    pre = PreemptionHandler.from_env(default_max_requeues=cfg.run.max_requeues)
    pre.install()
    for step in ...:
        ...optimizer step, metrics...
        if pre.should_stop():          # every rank, every step
            save_checkpoint(step); dist.barrier()
            if rank == 0: pre.requeue()
            break
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from typing import Callable, Optional, Union

from shardtrain.exitcodes import ENV_MAX_REQUEUES, ENV_PREEMPT_SIGNAL, signal_number

__all__ = ["PreemptionHandler", "shared_handler", "release_shared"]

#: A SECOND signal this many seconds or more after the first stops the process at once (exit 128+N).
#: Closer ones are the same event delivered twice (scancel signals every process of the step AND
#: torchrun forwards its own SIGTERM to the workers), so they must not cancel the checkpoint.
SECOND_SIGNAL_AFTER_S = 2.0
#: Every signal that means "stop soon": Slurm's warning (USR2 by default; USR1 is the other common
#: choice), scancel / pre-emption (TERM) and Ctrl-C or torchrun forwarding it (INT).
DEFAULT_SIGNALS = ("SIGUSR2", "SIGTERM", "SIGINT", "SIGUSR1")

log = logging.getLogger("shardtrain.preempt")


class PreemptionHandler:
    """Turns pre-emption signals into an agreed stop at an optimizer-step boundary."""

    def __init__(
        self, signals: tuple[str, ...] = DEFAULT_SIGNALS, max_requeues: int = 3
    ) -> None:
        self.signals: tuple[signal.Signals, ...] = tuple(
            dict.fromkeys(signal_number(s) for s in signals)
        )
        self.max_requeues = int(max_requeues)
        self._flag = False
        self._received: Optional[int] = None
        self._previous: dict[signal.Signals, Union[Callable, int, None]] = {}
        self._first_at: Optional[float] = None
        self._saved = False

    @classmethod
    def from_env(
        cls,
        default_signals: tuple[str, ...] = DEFAULT_SIGNALS,
        default_max_requeues: int = 3,
    ) -> "PreemptionHandler":
        """Use ``SHARDTRAIN_PREEMPT_SIGNAL`` (plus SIGTERM) and ``SHARDTRAIN_MAX_REQUEUES`` when a
        rendered batch script set them, else the defaults."""
        sig = os.environ.get(ENV_PREEMPT_SIGNAL)
        signals = (sig, *default_signals) if sig else default_signals
        limit = os.environ.get(ENV_MAX_REQUEUES)
        return cls(signals, int(limit) if limit else default_max_requeues)

    # -- signals ----------------------------------------------------------------------------

    def _handler(self, signum, frame) -> None:
        # Only set a flag: Python runs this between bytecodes of the main thread, and anything
        # heavier (logging takes locks, collectives, I/O) could deadlock or re-enter the loop.
        now = time.monotonic()
        if self._saved:  # the stop checkpoint is complete and the process is exiting: nothing to cut short
            return         # (under Slurm, `scontrol requeue` sends the SIGTERM that lands here)
        if self._flag and self._first_at is not None and now - self._first_at >= SECOND_SIGNAL_AFTER_S:
            # Second signal: stop NOW. Safe for the checkpoints: a save in progress only ever writes
            # into checkpoints/.tmp_step_N (renamed when complete), so the last complete one stays.
            try:
                os.write(2, b"[shardtrain] second signal %d: stopping now (the last complete checkpoint is "
                            b"kept)\n" % signum)
            finally:
                os._exit(128 + signum)
        self._flag = True
        if self._received is None:
            self._received = signum
            self._first_at = now
        try:
            os.write(2, b"[shardtrain] pre-emption signal %d: checkpoint at the next step\n" % signum)
        except OSError:
            pass

    def install(self) -> None:
        """Install flag-setting handlers (main thread only). Overrides any inherited disposition,
        including SIG_IGN (launchers are started with the signal ignored so they survive it).
        The signal named by ``SHARDTRAIN_PREEMPT_SIGNAL`` is added when set."""
        sigs = list(self.signals)
        extra = _from_env(ENV_PREEMPT_SIGNAL, signal_number, "a signal")
        if extra is not None and extra not in sigs:
            sigs.append(extra)
            self.signals = tuple(sigs)
        for s in sigs:
            prev = signal.signal(s, self._handler)
            self._previous.setdefault(s, prev)

    def uninstall(self) -> None:
        """Restore the dispositions :meth:`install` replaced."""
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def signalled(self) -> bool:
        """True once this rank received one of the signals."""
        return self._flag

    @property
    def received_signal(self) -> Optional[str]:
        """Name of the first signal received (``"SIGUSR2"``), or None."""
        return signal.Signals(self._received).name if self._received is not None else None

    def mark_saved(self) -> None:
        """The agreed stop's checkpoint is complete: later signals are ignored (the rank exits anyway)."""
        self._saved = True

    # -- agreement --------------------------------------------------------------------------

    def should_stop(self) -> bool:
        """COLLECTIVE: every rank calls it at each optimizer-step boundary. True on all ranks when
        any rank was signalled (all_reduce MAX over the default process group); without an
        initialized process group, the local flag."""
        local = self._flag
        try:
            import torch
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch is a dependency
            return local
        if not (dist.is_available() and dist.is_initialized()):
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=_collective_device(dist))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and not local:
            log.info("another rank was signalled: stopping at this step")
        return stop

    # -- requeue ----------------------------------------------------------------------------

    def requeue(self) -> bool:
        """Rank 0, after every rank saved (after a barrier): ``scontrol requeue $SLURM_JOB_ID``
        while ``SLURM_RESTART_COUNT`` < the limit (``SHARDTRAIN_MAX_REQUEUES`` when the batch
        script set it, else ``max_requeues``). Returns whether the job was requeued; logs why not."""
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            log.warning("not requeueing: SLURM_JOB_ID is not set (not running under Slurm)")
            return False
        limit = _from_env(ENV_MAX_REQUEUES, int, "an integer")
        limit = self.max_requeues if limit is None else limit
        try:
            restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        except ValueError:
            restarts = 0
        if restarts >= limit:
            log.warning(
                "not requeueing job %s: SLURM_RESTART_COUNT=%d reached the limit of %d requeues",
                job_id, restarts, limit,
            )
            return False
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            log.warning("not requeueing job %s: scontrol is not on PATH", job_id)
            return False
        # `scontrol requeue` makes Slurm terminate the running job at once, and the SIGTERM goes
        # to every process of the job step -- scontrol itself included, which then may die before
        # it reports success. Run it with SIGTERM/SIGINT/SIGHUP ignored (set by sh, so no Python
        # runs between fork and exec); it is done in milliseconds, long before the SIGKILL.
        cmd = ["/bin/sh", "-c", 'trap "" TERM INT HUP; exec "$@"', "sh", scontrol, "requeue", job_id]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("not requeued: scontrol requeue %s failed: %s", job_id, exc)
            return False
        if proc.returncode != 0:
            log.warning(
                "not requeued: scontrol requeue %s exited %d: %s",
                job_id, proc.returncode, (proc.stderr or proc.stdout).strip(),
            )
            return False
        log.warning("requeued job %s (restart %d of at most %d)", job_id, restarts + 1, limit)
        return True


def _from_env(name: str, parse, what: str):
    """parse(os.environ[name]); None when unset or unparsable (with one warning naming the variable)."""
    v = os.environ.get(name)
    if not v:
        return None
    try:
        return parse(v)
    except ValueError:
        log.warning("ignoring %s=%r: not %s", name, v, what)
        return None


def _collective_device(dist) -> "torch.device":  # noqa: F821
    import torch

    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_SHARED: Optional[PreemptionHandler] = None


def shared_handler(default_max_requeues: Optional[int] = None) -> PreemptionHandler:
    """The process's handler, installed on first use. The worker calls this FIRST (before torch,
    the process group, the model or the data), so a signal that arrives during start-up is kept."""
    global _SHARED
    if _SHARED is None:
        _SHARED = PreemptionHandler.from_env()
        _SHARED.install()
    if default_max_requeues is not None and not os.environ.get(ENV_MAX_REQUEUES):
        _SHARED.max_requeues = int(default_max_requeues)
    return _SHARED


def release_shared() -> None:
    """Uninstall and forget the shared handler (end of a run; tests drive several runs per process)."""
    global _SHARED
    if _SHARED is not None:
        _SHARED.uninstall()
        _SHARED = None
