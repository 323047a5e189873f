"""The `run.memory_trace` table: the plan's per-phase terms against runtime/memtrace.py's measured peaks
(memory_rank{R}.json "memory_trace" and logs/memory_table.txt)."""
from __future__ import annotations

from shardtrain.runtime.memtrace import PHASES, TERMS, StepMemTrace


def predicted_phases(plan_json: dict) -> tuple[dict, str | None]:
    """The plan's per-phase breakdown ({phase: {term: bytes, total}}), or its single per_gpu."""
    per = plan_json.get("per_phase")
    if per:
        return per, plan_json.get("peak_phase")
    return {"peak": plan_json["per_gpu"]}, "peak"


def comparison(predicted: dict, measured: dict, no_comm: dict | None = None) -> list[tuple]:
    """Rows (phase, term, predicted, measured): the plan's terms without cuda_context (no tensor
    holds it), against the tracker's categories folded into those terms; with `no_comm`, the
    phase's peak without collective temporaries too (the like-for-like total, see COLLECTIVES)."""
    rows = []
    phases = [p for p in PHASES if p in measured] or list(measured)
    for ph in phases:
        pred = predicted.get(ph) or predicted.get("peak") or {}
        meas = measured[ph]["terms"]
        for t in TERMS:
            if t == "comm_temp" and not meas.get(t):
                continue  # only gloo-style backends allocate inside collectives
            rows.append((ph, t, int(pred.get(t, 0)), int(meas.get(t, 0))))
        ptot = int(pred.get("total", 0)) - int(pred.get("cuda_context", 0))
        rows.append((ph, "total (no cuda_context)", ptot, int(meas["total"])))
        if no_comm and ph in no_comm and meas.get("comm_temp"):
            rows.append((ph, "total without comm_temp", ptot, int(no_comm[ph]["total"])))
    return rows


def render(rows: list[tuple], peak_phase: str | None, pred_peak_phase: str | None) -> str:
    from shardtrain.runtime.telemetry import _fmt
    out = [("phase", "term", "predicted", "measured", "diff")]
    for ph, t, p, m in rows:
        diff = f"{(m - p) / p * 100:+.1f}%" if p else ("=" if m == 0 else "n/a")
        out.append((ph, t, _fmt(p), _fmt(m), diff))
    w = [max(len(r[i]) for r in out) for i in range(5)]
    lines = ["  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r)) for r in out]
    lines.append(f"peak phase: measured {peak_phase}, predicted {pred_peak_phase}")
    return "\n".join(lines)


def trace_record(trace: StepMemTrace, plan) -> tuple[dict, str]:
    """The memory_rank{R}.json "memory_trace" block and the table the worker prints (`plan`: the Plan
    the rank runs, as read from plan.json)."""
    rep = trace.report()
    pred, pred_peak = predicted_phases(plan.to_json())
    rows = comparison(pred, rep["per_phase"], rep["no_comm_temp"]["per_phase"])
    rep["predicted_per_phase"] = pred
    rep["predicted_peak_phase"] = pred_peak
    rep["rows"] = [list(r) for r in rows]
    return rep, render(rows, rep["peak_phase"], pred_peak)
