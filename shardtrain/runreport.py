"""`shardtrain report RUN_DIR`: predicted vs measured memory per phase over a run, as a table and a PNG.

Reads what the worker wrote (the run-directory format: shardtrain/rundir_format.py):
  plan.json            the prediction: per_gpu (at the peak phase), per_phase, peak_phase, device memory
  metrics.jsonl        one "train" record per step with "memory": {after_forward, after_backward,
                       after_step} — on CUDA torch.cuda max_memory_allocated (peak since the step began,
                       so cumulative over the phases) / memory_allocated / memory_reserved; on CPU the
                       live model-state bytes and the process RSS (runtime/telemetry.py PhaseMemory)
  memory_rank{R}.json  model-state terms measured on the engine objects and, with run.memory_trace,
                       MemTracker's peak of live tensors per phase of the measured step
The PNG (matplotlib, Agg backend: no display needed) plots the per-step memory against the predicted
peak, the predicted peak without cuda_context (what tensors can reach) and the device limit.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shardtrain import rundir_format as rf
from shardtrain.units import fmt_bytes

PHASES = ("forward", "backward", "optimizer")
PHASE_SNAP = {"forward": "after_forward", "backward": "after_backward", "optimizer": "after_step"}


class ReportError(ValueError):
    pass


def load_run(run_dir: str | Path) -> dict:
    d = Path(run_dir)
    if not (d / rf.PLAN_JSON).is_file():
        raise ReportError(f"{d}: no {rf.PLAN_JSON} here; pass a run directory written by `shardtrain launch`")
    plan = json.loads((d / rf.PLAN_JSON).read_text())
    steps = [rec for rec in rf.read_metrics(d) if rf.is_train(rec) and rec.get(rf.MEMORY)]
    ranks = [json.loads(p.read_text()) for p in sorted(d.glob(rf.MEMORY_RANK_GLOB))]
    if not steps and not ranks:
        raise ReportError(f"{d}: no {rf.METRICS_JSONL} memory records and no {rf.MEMORY_RANK_GLOB} yet; "
                          "run the job (shardtrain launch) first")
    return {"dir": d, "plan": plan, "steps": steps, "ranks": ranks}


def _predicted(plan: dict) -> dict:
    """{phase: breakdown} from the plan (one "peak" entry for plans without per_phase)."""
    return plan.get("per_phase") or {"peak": plan["per_gpu"]}


def _tensor_total(b: dict) -> int:
    return int(b["total"]) - int(b.get("cuda_context", 0))


MODEL_STATE_TERMS = ("params", "grads", "master_params", "optimizer_states")


def _model_states(b: dict) -> int:
    """The predicted model-state bytes of a phase (what the CPU step records count on the engine objects)."""
    return sum(int(b.get(k, 0)) for k in MODEL_STATE_TERMS)


def basis(rows: list[dict]) -> str:
    """What the "measured" side of the comparison is, so that like is compared with like (issue 22):
    "memtracker" (every live tensor per phase, run.memory_trace), "cuda" (the allocator's peak: every
    tensor) or "model_states" (CPU without the trace: params, grads, master copies and optimizer states
    only — activations were not measured, so they are compared with the predicted model states only)."""
    if any("memtracker_live" in r for r in rows):
        return "memtracker"
    if any("cuda_max_allocated" in r for r in rows):
        return "cuda"
    return "model_states" if any("model_states" in r for r in rows) else "none"


def compared(row: dict, how: str) -> tuple[int, int]:
    """(predicted, measured) bytes of one phase row on the common basis."""
    if how == "memtracker":
        return row["predicted_tensors"], row.get("memtracker_live", 0)
    if how == "cuda":
        return row["predicted_tensors"], row.get("cuda_max_allocated", 0)
    if how == "model_states":
        return row["predicted_model_states"], row.get("model_states", 0)
    return row["predicted_tensors"], 0


NOT_MEASURED = ("activations were not measured (run.memory_trace is off): the measured model states are compared "
                "with the predicted model states only; set run.memory_trace: true to measure every tensor per phase")


def phase_rows(run: dict) -> list[dict]:
    """One row per phase: predicted (with and without cuda_context) and every measurement available."""
    pred = _predicted(run["plan"])
    traces = [r["memory_trace"] for r in run["ranks"] if r.get("memory_trace")]
    rows = []
    for ph in PHASES:
        p = pred.get(ph) or pred.get("peak")
        row = {"phase": ph, "predicted": int(p["total"]), "predicted_tensors": _tensor_total(p),
               "predicted_model_states": _model_states(p)}
        if traces:  # without gloo's collective temporaries, as the plan models NCCL (runtime/memtrace.py)
            row["memtracker_live"] = max((t.get("no_comm_temp") or t)["per_phase"].get(ph, {}).get("total", 0)
                                     for t in traces)
            raw = max(t["per_phase"].get(ph, {}).get("total", 0) for t in traces)
            if raw != row["memtracker_live"]:
                row["memtracker_with_comm"] = raw
        snaps = [s["memory"].get(PHASE_SNAP[ph], {}) for s in run["steps"]]
        if snaps and "max_allocated" in snaps[0]:
            row["cuda_max_allocated"] = max(s.get("max_allocated", 0) for s in snaps)
            row["cuda_reserved"] = max(s.get("reserved", 0) for s in snaps)
        elif snaps:
            row["model_states"] = max(s.get("model_states", 0) for s in snaps)
            row["rss"] = max(s.get("rss", 0) for s in snaps)
        rows.append(row)
    return rows


COLUMNS = (("predicted", "predicted"), ("predicted_tensors", "pred. − cuda ctx"),
           ("predicted_model_states", "pred. model states"),
           ("memtracker_live", "MemTracker peak"), ("memtracker_with_comm", "incl. gloo comm temp"),
           ("cuda_max_allocated", "max allocated*"),
           ("cuda_reserved", "reserved"), ("model_states", "model states"), ("rss", "process RSS"))


def render_table(run: dict, rows: list[dict]) -> str:
    plan = run["plan"]
    how = basis(rows)
    hidden = set() if how == "model_states" else {"predicted_model_states"}
    cols = [(k, h) for k, h in COLUMNS if k not in hidden and any(k in r for r in rows)]
    head = ["phase"] + [h for _, h in cols] + (["vs plan"] if how in ("memtracker", "model_states") else [])
    table = [head]
    for r in rows:
        line = [r["phase"] + (" (peak)" if r["phase"] == plan.get("peak_phase") else "")]
        line += [fmt_bytes(r[k]) if k in r else "" for k, _ in cols]
        if "vs plan" in head:
            p, m = compared(r, how)
            line.append(f"{(p - m) / m * 100:+.1f}%" if m else "")
        table.append(line)
    w = [max(len(x[i]) for x in table) for i in range(len(head))]
    out = [f"run {run['dir']}: {plan.get('strategy')} × {plan.get('world_size')} ranks, "
           f"{len(run['steps'])} steps with memory records, device {fmt_bytes(int(plan.get('gpu_memory_bytes', 0)))}"]
    out += ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(x)) for x in table]
    if any("cuda_max_allocated" in r for r in rows):
        out.append("* torch.cuda.max_memory_allocated since the step began: cumulative up to the end of the phase")
    if how == "memtracker":
        out.append("vs plan: (predicted − cuda_context − MemTracker peak) / MemTracker peak, fullest rank")
    elif how == "model_states":
        out.append("vs plan: (predicted model states − measured model states) / measured, fullest rank")
        out.append(NOT_MEASURED)
    ms = [r for r in run["ranks"] if r.get("measured")]
    if ms:
        pred = ms[0].get("predicted", {})
        meas = {k: max(r["measured"].get(k, 0) for r in ms) for k in pred}
        out.append("model states (engine objects): " + ", ".join(
            f"{k} {fmt_bytes(meas[k])} / predicted {fmt_bytes(int(v))}" for k, v in pred.items()))
    return "\n".join(out)


SERIES = (("max_allocated", "max allocated (step peak)"), ("reserved", "reserved"), ("rss", "process RSS"),
          ("model_states", "live model states"))


def step_series(run: dict) -> tuple[list[int], dict[str, tuple[list[int], list[int]]]]:
    """Per-step measured series for the plot: {label: (steps, bytes)}, each over the steps that
    recorded it (the CPU model-state count is taken on the measured step only)."""
    xs = [int(s["step"]) for s in run["steps"]]
    series: dict[str, tuple[list[int], list[int]]] = {}
    for s in run["steps"]:
        snaps = s["memory"].values()
        for key, label in SERIES:
            vals = [v[key] for v in snaps if key in v]
            if vals:
                pts = series.setdefault(label, ([], []))
                pts[0].append(int(s["step"]))
                pts[1].append(max(vals))
    return xs, series


def write_png(run: dict, rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plan = run["plan"]
    xs, series = step_series(run)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    gib = 2 ** 30
    for name, (sx, ys) in series.items():
        ax.plot(sx, [y / gib for y in ys], marker="o", ms=3, label=f"measured: {name}")
    peak = int(plan["per_gpu"]["total"])
    ax.axhline(peak / gib, color="tab:red", ls="--", label=f"predicted peak {fmt_bytes(peak)}")
    ax.axhline(_tensor_total(plan["per_gpu"]) / gib, color="tab:orange", ls=":",
               label="predicted peak − cuda_context")
    limit = int(plan.get("gpu_memory_bytes", 0))
    if limit:
        ax.axhline(limit / gib, color="black", lw=1.5, label=f"device limit {fmt_bytes(limit)}")
        tops = [peak, limit] + [y for _, ys in series.values() for y in ys]
        if limit > 20 * max(1, min(t for t in tops if t > 0)):
            ax.set_yscale("log")  # a tiny CPU run against an 80 GiB device: keep both readable
    if basis(rows) == "model_states":  # the one measured model-state point needs its own prediction to compare
        ms = max(r["predicted_model_states"] for r in rows)
        ax.axhline(ms / gib, color="tab:purple", ls="-.", lw=1, label=f"predicted model states {fmt_bytes(ms)}")
    traced = [r["memtracker_live"] for r in rows if r.get("memtracker_live")]
    if traced and xs:
        at = xs[min(1, len(xs) - 1)]  # the worker measures the second step of the run (worker.measure_at)
        ax.scatter([at], [max(traced) / gib], marker="*", s=150, color="tab:green", zorder=5,
                   label="MemTracker peak (measured step)")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("GiB per rank")
    ax.set_title(f"{plan.get('strategy')} × {plan.get('world_size')}: memory per step")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    idx = range(len(rows))
    how = basis(rows)
    pairs = [compared(r, how) for r in rows]  # like with like: model states against model states (issue 22)
    unit, size = ("GiB", gib) if max(max(p) for p in pairs) >= gib else ("MiB", 2 ** 20)
    pred_label = "predicted model states" if how == "model_states" else "predicted − cuda_context"
    bx.bar([i - 0.2 for i in idx], [p / size for p, _ in pairs], width=0.4, label=pred_label, color="tab:orange")
    meas_label = {"memtracker": "measured: MemTracker peak", "cuda": "measured: max allocated",
                  "model_states": "measured: model states"}.get(how, "measured")
    bx.bar([i + 0.2 for i in idx], [m / size for _, m in pairs], width=0.4, label=meas_label, color="tab:blue")
    bx.set_ylabel(f"{unit} per rank")
    bx.set_xticks(list(idx), [r["phase"] for r in rows])
    bx.set_title("per phase: model states only (activations not measured)" if how == "model_states" else "per phase",
                 fontsize=9 if how == "model_states" else None)
    bx.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_report(args: argparse.Namespace) -> int:
    try:
        run = load_run(args.run_dir)
    except ReportError as e:
        print(f"shardtrain: error: {e}", file=sys.stderr)
        return 1
    rows = phase_rows(run)
    png = Path(args.png) if args.png else run["dir"] / "memory_report.png"
    write_png(run, rows, png)
    if args.json:
        how = basis(rows)
        print(json.dumps({"run_dir": str(run["dir"]), "peak_phase": run["plan"].get("peak_phase"),
                          "compared": how, "activations_measured": how in ("memtracker", "cuda"),
                          "phases": rows, "png": str(png)}, indent=2))
    else:
        print(render_table(run, rows))
        print(f"plot: {png}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("report", help="predicted vs measured memory per phase of a run (table + PNG)")
    p.add_argument("run_dir", help=f"run directory ({rf.PLAN_JSON}, {rf.METRICS_JSONL}, {rf.MEMORY_RANK_GLOB})")
    p.add_argument("--png", help="where to write the plot (default RUN_DIR/memory_report.png)")
    p.add_argument("--json", action="store_true", help="print the per-phase numbers as JSON")
    p.set_defaults(func=cmd_report)
