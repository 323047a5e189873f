"""torch.profiler over a window of optimizer steps, written as {op: self CPU ms per step, calls per step}.

Shared by both sides of benchmarks/profile_step.py (rank 0 only), so they are measured the same way.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


class StepWindow:
    """Profile optimizer steps at .. at+count-1 (0-based); begin(step)/end(step) around each step."""

    def __init__(self, out: str | os.PathLike | None, *, rank: int):
        self.at = int(os.environ.get("SHARDTRAIN_PROFILE_AT", "4"))
        self.count = int(os.environ.get("SHARDTRAIN_PROFILE_COUNT", "3"))
        self.out = Path(out) if out and rank == 0 else None
        self.prof = None
        self.t0 = 0.0

    def begin(self, step: int) -> None:
        if self.out is not None and step == self.at:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.start()
            self.t0 = time.perf_counter()

    def end(self, step: int) -> None:
        if self.prof is None or step != self.at + self.count - 1:
            return
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        ops = {e.key: {"self_ms": e.self_cpu_time_total / 1e3 / self.count, "calls": e.count / self.count}
               for e in self.prof.key_averages()}
        self.out.write_text(json.dumps({"wall_ms_per_step": wall * 1e3 / self.count, "steps": self.count,
                                        "ops": ops}))
        self.prof = None
