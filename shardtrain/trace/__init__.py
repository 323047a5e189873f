"""`shardtrain plan --trace`: the plan's real training step traced under FakeTensorMode (imports torch;
not part of the pure compiler). Public API: `trace_plan(plan) -> TraceResult`."""
from __future__ import annotations

import time
from dataclasses import dataclass

from shardtrain.trace.step import PHASES, TraceError, check_traceable

__all__ = ["TraceError", "TraceResult", "trace_plan", "check_traceable"]


@dataclass(frozen=True)
class TraceResult:
    """Per-rank peak bytes of live tensors, by phase and category (rank 0 of the plan's world)."""
    total: int
    peak_phase: str
    per_phase: dict
    by_category: dict
    untraced: tuple[str, ...]
    tool: str
    world_size: int
    seconds: float
    host: dict = None
    """host memory the step used instead of device memory, not in any device total: {"ckpt_offload": the
    runtime stash's bytes of one micro-step (ckpt_offload.ckpt_stash(model).bytes), "ckpt_offload_peak":
    the tracked peak of its live host copies}; empty without checkpoint offload"""

    def to_json(self) -> dict:
        return {"total": self.total, "peak_phase": self.peak_phase, "per_phase": self.per_phase,
                "by_category": self.by_category, "untraced": list(self.untraced), "tool": self.tool,
                "world_size": self.world_size, "seconds": round(self.seconds, 2),
                **({"host": dict(self.host)} if self.host else {})}


def trace_plan(plan, *, steps: int = 2) -> TraceResult:
    """Trace `steps` optimizer steps of the plan's chosen candidate; raises TraceError when the plan
    cannot be traced. Terms that cannot be traced come from the analytic model and are named in
    `untraced`: cuda_context (and DDP's 2 in-flight buckets) are added to the total."""
    from shardtrain.trace.step import trace_step
    t0 = time.perf_counter()
    phases, tool, world, host = trace_step(plan, steps=steps)
    pg = plan.chosen.per_gpu
    extra = {"cuda_context": pg.cuda_context}
    if plan.chosen.strategy.engine.value == "ddp":
        extra["ddp_buckets"] = pg.buffers   # reducer buckets, allocated in C++ (untraceable)
    per_phase = {}
    for ph in PHASES:
        d = {k: v for k, v in phases[ph].items() if k != "total" and v}
        d.update(extra)
        d["total"] = sum(d.values())
        per_phase[ph] = d
    peak = max(PHASES, key=lambda p: per_phase[p]["total"])
    untraced = tuple(extra)
    return TraceResult(total=per_phase[peak]["total"], peak_phase=peak, per_phase=per_phase,
                       by_category={k: v for k, v in per_phase[peak].items() if k != "total"},
                       untraced=untraced, tool=tool, world_size=world, seconds=time.perf_counter() - t0,
                       host=host)
