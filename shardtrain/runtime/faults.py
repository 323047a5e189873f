"""TEST-ONLY hooks, all in this one module (issues 9, 13). Never set these in production.

The multi-process tests need environment variables: a fixture cannot monkeypatch a rank that torchrun
spawned. Every hook is read from the environment where it acts (one dict lookup, nothing else, when
unset) so a test driver can change them between runs in one process.

``SHARDTRAIN_TEST_KILL="ATTEMPT:RANK:STEP:POINT[;...]"`` — in restart attempt ATTEMPT (torchrun's
``TORCHELASTIC_RESTART_COUNT``, 0 for the first run), rank RANK sends itself SIGKILL at STEP:
POINT ``step`` right after that optimizer step (a worker dying mid-run), ``save`` in the middle of
saving the checkpoint of that step (after its files are written into ``.tmp_step_N``, before the
checkpoint is sealed), ``node`` after that step, SIGKILLing its torchrun agent first (a node lost for
good: issue 21's scale-down). SIGKILL, like the OOM killer or a node failure: no handler, no cleanup.
``SHARDTRAIN_TEST_SIGNAL_AT_STEP=N[:SIG]`` — after optimizer step N rank 0 sends itself SIGUSR2 (a
simulated Slurm warning), or SIG.
``SHARDTRAIN_TEST_OOM_AT_MICRO_BATCH=B`` — an injected allocation limit (below).
``SHARDTRAIN_TEST_FREE_BYTES=N`` — the checkpoint file system reports N free bytes (runtime/ckpt_files.py:
exercises the free-disk preflight without filling a disk).
``SHARDTRAIN_TEST_NONFINITE="RANK:STEP[,STEP...]"`` — rank RANK's loss is multiplied by NaN in those
optimizer steps (1-based), before backward: a NaN loss and NaN gradients on one rank (issue 21's guard).
``SHARDTRAIN_TEST_DAMAGE="STEP:RELPATH"`` — right after the checkpoint of step STEP is sealed, rank 0
overwrites 400 bytes in the middle of ``step_STEP/RELPATH`` (a glob; ``LARGEST``: the checkpoint's largest
file), keeping its size: the same-size damage a disk or a copy can do, which only the manifest's digests
catch (issue 21).
"""
from __future__ import annotations

import os
import signal

TEST_KILL_ENV = "SHARDTRAIN_TEST_KILL"
TEST_SIGNAL_ENV = "SHARDTRAIN_TEST_SIGNAL_AT_STEP"
TEST_FREE_BYTES_ENV = "SHARDTRAIN_TEST_FREE_BYTES"
TEST_NONFINITE_ENV = "SHARDTRAIN_TEST_NONFINITE"
TEST_DAMAGE_ENV = "SHARDTRAIN_TEST_DAMAGE"
#: Bytes overwritten by SHARDTRAIN_TEST_DAMAGE (issue 21 measured the loss jump with 400 flipped bytes).
DAMAGE_BYTES = 400


def test_signal() -> tuple[int, signal.Signals] | None:
    """(step, signal) from SHARDTRAIN_TEST_SIGNAL_AT_STEP ("3" or "3:TERM"), None when unset."""
    v = os.environ.get(TEST_SIGNAL_ENV)
    if not v:
        return None
    from shardtrain.exitcodes import signal_number
    at, _, name = v.partition(":")
    step = int(at or 0)
    return (step, signal_number(name or "USR2")) if step else None


def maybe_kill(point: str, rank: int, step: int) -> None:
    spec = os.environ.get(TEST_KILL_ENV)
    if not spec:
        return
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    for item in spec.split(";"):
        a, r, s, p = item.split(":")
        if (int(a), int(r), int(s)) == (attempt, rank, step) and (p == point or (p, point) == ("node", "step")):
            if p == "node":  # the whole node is lost for good: its torchrun agent first (nothing restarts there)
                os.write(2, f"[shardtrain] TEST: rank {rank} SIGKILLs its node's agent at step {step}\n".encode())
                os.kill(os.getppid(), signal.SIGKILL)
            os.write(2, f"[shardtrain] TEST: rank {rank} SIGKILLs itself at step {step} ({point})\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(loss, rank: int, step: int):
    """``loss`` times NaN when SHARDTRAIN_TEST_NONFINITE names this rank and optimizer step, else ``loss``."""
    spec = os.environ.get(TEST_NONFINITE_ENV)
    if not spec:
        return loss
    r, _, steps = spec.partition(":")
    if int(r) == rank and step in {int(x) for x in steps.split(",") if x}:
        return loss * float("nan")
    return loss


def maybe_damage(run_dir, step: int, rank: int) -> None:
    """SHARDTRAIN_TEST_DAMAGE: overwrite DAMAGE_BYTES in the middle of a sealed checkpoint file (rank 0)."""
    spec = os.environ.get(TEST_DAMAGE_ENV)
    if not spec or rank != 0:
        return
    at, _, pattern = spec.partition(":")
    if int(at) != step:
        return
    from shardtrain import rundir_format as rf
    d = rf.checkpoint_dir(run_dir, step)
    files = sorted(d.glob(pattern)) if pattern != "LARGEST" else \
        sorted((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)[-1:]
    for p in files:
        size = p.stat().st_size
        with open(p, "r+b") as f:
            start = max(0, size // 2 - DAMAGE_BYTES // 2)
            f.seek(start)
            old = f.read(min(DAMAGE_BYTES, size - start))
            f.seek(start)
            f.write(bytes(b ^ 0xFF for b in old))  # every bit flipped: certainly different, same size
        os.write(2, f"[shardtrain] TEST: damaged {len(old)} bytes of {p}\n".encode())


# ------------------------------------------------------------------ out of memory (issue 13 (g))
#: TEST-ONLY: simulate the device running out of memory in the forward pass of the first step whenever
#: this process's micro batch is >= the value (an injected allocation limit: CPU has no device limit).
TEST_OOM_ENV = "SHARDTRAIN_TEST_OOM_AT_MICRO_BATCH"
_where: dict = {"phase": "setup", "step": None, "micro_batch": None}


def at(phase: str, step: int | None, micro_batch: int | None = None) -> None:
    """Remember where this rank is (for the OOM record)."""
    _where.update(phase=phase, step=step, **({"micro_batch": micro_batch} if micro_batch else {}))


def maybe_oom(step: int, micro_batch: int) -> None:
    at("forward", step, micro_batch)
    limit = os.environ.get(TEST_OOM_ENV)
    if limit and micro_batch >= int(limit):
        import torch
        raise torch.OutOfMemoryError(f"TEST: injected allocation limit: micro batch {micro_batch} >= {limit} "
                                     f"({TEST_OOM_ENV})")


def record_oom(run_dir, rank: int, exc: BaseException) -> None:
    """Write <run dir>/oom/rank{R}.json: where it happened and the measured peak (CUDA: max allocated;
    CPU: the process's peak RSS), for `launch --on-oom replan` (launcher/oom.py)."""
    import json
    import resource
    from pathlib import Path

    from shardtrain import rundir_format as rf
    peak, device, capacity = 0, "cpu", 0
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = int(torch.cuda.max_memory_allocated())
            device = "cuda"
            capacity = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    except Exception:  # noqa: BLE001 - the record must be written even if CUDA is in a bad state
        pass
    if not peak:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    d = Path(run_dir) / rf.OOM_DIR
    d.mkdir(parents=True, exist_ok=True)
    rec = {"rank": rank, **_where, "device": device, "device_capacity_bytes": capacity,
           "measured_peak_bytes": peak, "error": str(exc)[:500]}
    (d / rf.oom_record_name(rank)).write_text(json.dumps(rec))
