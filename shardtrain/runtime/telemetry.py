"""Metrics JSONL, per-phase memory, leak warning, progress bar, predicted-vs-measured table.

Per-phase memory: on CUDA `max_memory_allocated` / `memory_reserved` (peak stats reset every step);
on CPU the bytes of the live model states (params, grads, optimizer states, counted from the engine
objects by shardtrain.runtime.state_bytes) plus the process RSS, and after the step the C heap's bytes
in use (glibc mallinfo2: where torch's CPU tensors live).

The leak check compares like with like (issue 22: the demo printed "possible leak" for our own loop):
it used the process RSS on CPU, which swings by ±8 MiB from step to step with no tensor kept (glibc maps
and unmaps the large per-step buffers: the RSS of a tiny-Llama loop went 402 → 418 → 410 → 420 MiB while
the heap in use stayed at 135.9 MiB ± 40 KiB), so five rising steps in a row came by chance. On CPU it
now reads the heap in use (CUDA: memory_allocated), counts its warm-up from the run's first step, and
asks for growth through several whole windows of steps, so that neither noise nor one-off allocations
(the optimizer states of step 1, the first checkpoint's buffers) are a leak.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from shardtrain.rundir_format import STEP, iter_metrics

log = logging.getLogger("shardtrain.worker")
MiB = 2**20
#: Steps per window of the leak check, and how many consecutive windows must each grow.
LEAK_WINDOW = 5
LEAK_WINDOWS = 3
#: Steps of this run (counted from its first, also after a resume) before the leak check starts: step 1
#: allocates the optimizer states, step 2 rebuilds DDP's buckets and is the measured step.
LEAK_WARMUP_STEPS = 5


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h, glibc >= 2.33): size_t fields."""
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC: list = []


def heap_in_use_bytes() -> int | None:
    """Bytes the C heap has handed out and not freed (mallinfo2: uordblks + hblkhd, i.e. arena chunks in
    use plus mmapped chunks), or None where glibc's mallinfo2 is missing (musl, macOS, glibc < 2.33).
    torch's CPU allocator takes tensor memory from malloc, so this is the CPU counterpart of
    torch.cuda.memory_allocated. ~0.15 ms per call on the tiny model."""
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None)
            fn = libc.mallinfo2
            fn.restype = _MallInfo2
            _LIBC.append(fn)
        except (OSError, AttributeError):
            _LIBC.append(None)
    fn = _LIBC[0]
    if fn is None:
        return None
    m = fn()
    return int(m.uordblks + m.hblkhd)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseMemory:
    """Memory snapshots at the phases of one optimizer step."""

    def __init__(self, device: torch.device, live_bytes):
        self.device = device
        self.live_bytes = live_bytes  # () -> int, live model-state bytes (CPU accounting)
        self.phases: dict[str, dict[str, int]] = {}
        # Walking the engine objects (live_bytes, ~0.1 ms per snapshot on the tiny model) only on the
        # measured step; other steps keep the free counters (RSS from /proc, the CUDA allocator's stats).
        self.measure = True

    def begin_step(self) -> None:
        self.phases = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def snap(self, phase: str) -> None:
        if self.device.type == "cuda":
            self.phases[phase] = {"allocated": torch.cuda.memory_allocated(self.device),
                                  "max_allocated": torch.cuda.max_memory_allocated(self.device),
                                  "reserved": torch.cuda.memory_reserved(self.device)}
        else:
            self.phases[phase] = ({"model_states": int(self.live_bytes()), "rss": rss_bytes()} if self.measure
                                  else {"rss": rss_bytes()})
            heap = heap_in_use_bytes() if phase == "after_step" else None
            if heap is not None:
                self.phases[phase]["heap_in_use"] = heap

    def steady_value(self) -> int:
        """The after-step number a leak shows up in: allocated on CUDA, the heap in use on CPU (RSS where
        mallinfo2 is missing)."""
        s = self.phases.get("after_step", {})
        return s.get("allocated", s.get("heap_in_use", s.get("rss", 0)))


class LeakDetector:
    """Warn once when the after-step memory rose through LEAK_WINDOWS consecutive windows of LEAK_WINDOW
    steps: every value of a window above every value of the one before (no overlap: noise without a
    trend never orders whole windows), each window's floor (its minimum) at least ``min_rise`` (1 MiB, or
    0.25%) above the previous floor, and ``min_growth`` (4 MiB, or 1%) in all. The first
    LEAK_WARMUP_STEPS steps of the run are not counted. A one-off allocation raises one window only; a
    leak of ~0.3 MiB per step or more raises them all (the classic: per-step tensors kept in a list)."""

    def __init__(self, window: int = LEAK_WINDOW, windows: int = LEAK_WINDOWS, min_growth: int = 4 * MiB,
                 min_rise: int = MiB, warmup_steps: int = LEAK_WARMUP_STEPS):
        self.window, self.windows = window, windows
        self.min_growth, self.min_rise, self.warmup = min_growth, min_rise, warmup_steps
        self.seen = 0
        self.current: list[int] = []
        self.levels: list[tuple[int, int]] = []  # (min, max) of each complete window
        self.warned = False

    def update(self, step: int, value: int) -> str | None:
        self.seen += 1
        if self.seen <= self.warmup or self.warned or not value:
            return None
        self.current.append(value)
        if len(self.current) < self.window:
            return None
        self.levels = (self.levels + [(min(self.current), max(self.current))])[-(self.windows + 1):]
        self.current = []
        w = self.levels
        if len(w) <= self.windows:
            return None
        rising = all(lo_b > hi_a and lo_b - lo_a >= max(self.min_rise, 0.0025 * lo_a)
                     for (lo_a, hi_a), (lo_b, _) in zip(w, w[1:]))
        first, last = w[0][0], w[-1][0]
        if rising and last - first >= max(self.min_growth, 0.01 * first):
            self.warned = True
            return (f"memory in use after the optimizer step grew in each of the last {self.windows} windows of "
                    f"{self.window} steps ({first / MiB:.1f} → {last / MiB:.1f} MiB over {self.windows * self.window} "
                    f"steps, up to step {step}): possible leak (tensors kept across steps, e.g. losses stored "
                    "without .item())")
        return None


class MetricsWriter:
    """Rank 0 appends one JSON object per line to metrics.jsonl, in batches: a write is buffered and
    the buffer appended when it holds `flush_every` records or `flush_interval_s` passed since the last
    append (slow steps are still written one by one), and by `flush()` — which the worker calls before
    every checkpoint, on pre-emption and at the end — and at interpreter exit. A hard kill loses at most
    the buffered records after the last checkpoint, which resume re-trains and `truncate_after` cuts."""

    def __init__(self, path: Path, enabled: bool, flush_every: int = 32, flush_interval_s: float = 1.0):
        self.path, self.enabled = Path(path), enabled
        self.flush_every, self.flush_interval_s = flush_every, flush_interval_s
        self._buf: list[str] = []
        self._last = time.monotonic()
        if enabled:
            import atexit
            atexit.register(self.flush)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint, so each step appears once."""
        self.flush()
        if not self.enabled or not self.path.is_file():
            return
        keep = [json.dumps(rec) for rec in iter_metrics(self.path) if rec.get(STEP, 0) <= step]  # skips cut lines
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, rec: dict) -> None:
        if self.enabled:
            self._buf.append(json.dumps(rec) + "\n")
            if len(self._buf) >= self.flush_every or time.monotonic() - self._last >= self.flush_interval_s:
                self.flush()

    def flush(self) -> None:
        if self._buf:
            data = "".join(self._buf).encode()
            with open(self.path, "ab+") as f:  # appends go to the end whatever the read position
                if f.seek(0, 2) and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                    data = b"\n" + data  # after a line cut by a kill: start a fresh line, keep the record
                f.write(data)
            self._buf = []
        self._last = time.monotonic()

    def close(self) -> None:
        self.flush()


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=tty, ncols=None if tty else 100, mininterval=1.0 if tty else 5.0,
                disable=not enabled)


TERMS = ("params", "grads", "master_params", "optimizer_states")


def comparison_table(predicted: dict, measured: dict, cpu_predicted: int = 0, cpu_measured: int = 0,
                     peak: dict | None = None) -> str:
    """Predicted (plan) vs measured model-state bytes per rank."""
    rows = [("term", "predicted", "measured", "diff")]

    def row(name, p, m):
        diff = f"{(m - p) / p * 100:+.1f}%" if p else ("=" if m == 0 else "n/a")
        rows.append((name, _fmt(p), _fmt(m), diff))
    for k in TERMS:
        row(k, int(predicted.get(k, 0)), int(measured.get(k, 0)))
    row("model states", sum(int(predicted.get(k, 0)) for k in TERMS), sum(int(measured.get(k, 0)) for k in TERMS))
    if cpu_predicted or cpu_measured:
        row("offloaded (host)", cpu_predicted, cpu_measured)
    for k, v in (peak or {}).items():
        rows.append((k, "", _fmt(v), ""))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
