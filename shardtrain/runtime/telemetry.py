"""Metrics JSONL, per-phase memory, leak warning, progress bar, predicted-vs-measured table.

Per-phase memory: on CUDA `max_memory_allocated` / `memory_reserved` (peak stats reset every step);
on CPU the bytes of the live model states (params, grads, optimizer states, counted from the engine
objects by shardtrain.runtime.state_bytes) plus the process RSS.
"""
from __future__ import annotations

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
LEAK_WINDOW = 5
LEAK_WARMUP_STEPS = 3


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

    def steady_value(self) -> int:
        """The after-step number a leak shows up in (allocated on CUDA, RSS on CPU)."""
        s = self.phases.get("after_step", {})
        return s.get("allocated", s.get("rss", 0))


class LeakDetector:
    """Warn when the after-step memory grows on every one of LEAK_WINDOW consecutive steps."""

    def __init__(self, window: int = LEAK_WINDOW, min_growth: int = 4 * MiB):
        self.window, self.min_growth = window, min_growth
        self.history: list[int] = []
        self.warned = False

    def update(self, step: int, value: int) -> str | None:
        if step < LEAK_WARMUP_STEPS:
            return None
        self.history = (self.history + [value])[-(self.window + 1):]
        h = self.history
        if (not self.warned and len(h) == self.window + 1 and all(b > a for a, b in zip(h, h[1:]))
                and h[-1] - h[0] > max(self.min_growth, 0.01 * h[0])):
            self.warned = True
            return (f"memory grew on each of the last {self.window} steps ({h[0] / MiB:.1f} → "
                    f"{h[-1] / MiB:.1f} MiB after the optimizer step): possible leak (tensors kept "
                    "across steps, e.g. losses stored without .item())")
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
