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


def phase_rows(run: dict) -> list[dict]:
    """One row per phase: predicted (with and without cuda_context) and every measurement available."""
    pred = _predicted(run["plan"])
    traces = [r["memory_trace"] for r in run["ranks"] if r.get("memory_trace")]
    rows = []
    for ph in PHASES:
        p = pred.get(ph) or pred.get("peak")
        row = {"phase": ph, "predicted": int(p["total"]), "predicted_tensors": _tensor_total(p)}
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
           ("memtracker_live", "MemTracker peak"), ("memtracker_with_comm", "incl. gloo comm temp"),
           ("cuda_max_allocated", "max allocated*"),
           ("cuda_reserved", "reserved"), ("model_states", "model states"), ("rss", "process RSS"))


def render_table(run: dict, rows: list[dict]) -> str:
    plan = run["plan"]
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]
    head = ["phase"] + [h for _, h in cols] + (["vs plan"] if any("memtracker_live" in r for r in rows) else [])
    table = [head]
    for r in rows:
        line = [r["phase"] + (" (peak)" if r["phase"] == plan.get("peak_phase") else "")]
        line += [fmt_bytes(r[k]) if k in r else "" for k, _ in cols]
        if "vs plan" in head:
            m, p = r.get("memtracker_live", 0), r["predicted_tensors"]
            line.append(f"{(p - m) / m * 100:+.1f}%" if m else "")
        table.append(line)
    w = [max(len(x[i]) for x in table) for i in range(len(head))]
    out = [f"run {run['dir']}: {plan.get('strategy')} × {plan.get('world_size')} ranks, "
           f"{len(run['steps'])} steps with memory records, device {fmt_bytes(int(plan.get('gpu_memory_bytes', 0)))}"]
    out += ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(x)) for x in table]
    if any("cuda_max_allocated" in r for r in rows):
        out.append("* torch.cuda.max_memory_allocated since the step began: cumulative up to the end of the phase")
    if "vs plan" in head:
        out.append("vs plan: (predicted − cuda_context − MemTracker peak) / MemTracker peak, fullest rank")
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
    bx.bar([i - 0.2 for i in idx], [r["predicted_tensors"] / gib for r in rows], width=0.4,
           label="predicted − cuda_context", color="tab:orange")
    meas = [r.get("memtracker_live", r.get("cuda_max_allocated", r.get("model_states", 0))) for r in rows]
    bx.bar([i + 0.2 for i in idx], [m / gib for m in meas], width=0.4, label="measured", color="tab:blue")
    bx.set_xticks(list(idx), [r["phase"] for r in rows])
    bx.set_title("per phase")
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
        print(json.dumps({"run_dir": str(run["dir"]), "peak_phase": run["plan"].get("peak_phase"),
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
