"""Text rendering of a trace beside the plan's analytic phases (pure string building)."""
from __future__ import annotations

from shardtrain.trace.step import PHASES
from shardtrain.units import fmt_bytes


def render_trace(plan, res) -> str:
    c = plan.chosen
    analytic = dict(c.per_phase)
    out = [f"trace      {res.tool}, world size {res.world_size} ({plan.parallel.label()}), {res.seconds:.1f} s "
           "(FakeTensorMode on CPU; "
           f"untraced, from the analytic model: {', '.join(res.untraced) or 'nothing'}{_host(res)})",
           "           phase       analytic      traced    analytic/traced"]
    for ph in PHASES:
        a = analytic[ph].total if ph in analytic else 0
        tr = res.per_phase[ph]["total"]
        out.append(f"           {ph:<10}{fmt_bytes(a):>10}  {fmt_bytes(tr):>10}    {a / tr if tr else 0:>6.3f}")
    a = c.per_gpu.total
    out.append(f"           {'peak':<10}{fmt_bytes(a):>10}  {fmt_bytes(res.total):>10}    {a / res.total:>6.3f}"
               f"   (analytic peak: {c.peak_phase}, traced peak: {res.peak_phase})")
    return "\n".join(out)


def _host(res) -> str:
    """Checkpoint offload's host copies: host memory on a GPU, so in no traced device figure; the bytes as
    the runtime's stash counts them (runtime/ckpt_offload.py ckpt_stash(model).bytes, one micro-step)."""
    host = getattr(res, "host", None) or {}
    if "ckpt_offload" not in host:
        return ""
    return (f"; host, not in the device figures: checkpoint offload {fmt_bytes(host['ckpt_offload'])} a micro-step "
            "(the runtime stash's bytes)")


def trace_or_error(plan):
    """(TraceResult, None) or (None, one-line error)."""
    from shardtrain.trace import TraceError, trace_plan
    try:
        return trace_plan(plan), None
    except TraceError as e:
        return None, str(e)
