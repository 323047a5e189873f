"""Issue 8, point 3: the measured truth of the per-rank peak, on CPU.

The project's own worker trains a small Llama (hidden 512, 4 layers, vocab 32000 so the logits
matter, seq 512; tests/fixtures/models/small-llama-32k.json) for two steps on 1 and 2 gloo ranks
with `run.memory_trace: true`: PyTorch's MemTracker / FSDPMemTracker in *real* mode records the
peak of live tensors per phase of the second step (runtime/memtrace.py). That measured per-rank
peak must be
  - at most 2% below and 5% above `shardtrain plan --trace` (FakeTensorMode trace of the same plan;
    DDP and FSDP2 only: DeepSpeed's internals cannot be traced), and
  - at most 2% below and 8% above the analytic plan's peak (PLAN_UNDER / PLAN_OVER): a plan below the
    truth is an OOM on a real GPU, so the band is asymmetric — the 2% allows for what the tracker
    cannot tell apart (allocator-free views, the step counter), not for a modelling gap; 8% above is
    the cost of the conservative instants (e.g. DeepSpeed's fp32 step partition next to activations),
compared like for like: the plan's total minus `cuda_context` (no tensor holds the CUDA context,
so neither tracker can see it) against the tracker's peak of live tensor bytes without the
temporaries gloo allocates *inside* a collective (its reduce-scatter copies FSDP2's flat gradient
input; NCCL, which the plan and the trace model, works in place: runtime/memtrace.py COLLECTIVES).
Both totals are in memory_rank{R}.json; the failure messages print both.

Two launches (one per world size), several scenarios each (tests/runtime/driver.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_driver

pytestmark = pytest.mark.multiproc
MODEL = str(Path(__file__).resolve().parents[1] / "fixtures" / "models" / "small-llama-32k.json")
TRACE_TOL = 0.05
"""The trace may be at most 5% above the measured peak ..."""
TRACE_UNDER = 0.02
"""... and at most 2% below it (measured: -0.001% .. +1.6% over the six traceable points)."""
PLAN_UNDER = 0.02
"""The plan may be at most 2% below the measured peak (issue 19: a symmetric ±10% let -6.4% pass)."""
PLAN_OVER = 0.08
"""... and at most 8% above it."""

# (strategy, method, grad_ckpt): every engine, full and LoRA, checkpointing none and full, each
# world size; kept to eleven runs of two steps for the CI budget. fsdp_offload (issue 19): FSDP2 +
# CPUOffloadPolicy, whose host state is live next to the device terms on CPU (_host_resident).
SCENARIOS = {
    2: [("ddp", "full", "none"), ("ddp", "lora", "full"), ("fsdp_full_shard", "full", "full"),
        ("fsdp_full_shard", "lora", "none"), ("zero2", "full", "none"), ("zero3", "lora", "full"),
        ("fsdp_offload", "full", "full")],
    1: [("ddp", "full", "full"), ("fsdp_full_shard", "full", "none"), ("zero2", "lora", "full"),
        ("zero3", "full", "none")],
}
PARAMS = [(n, s, m, c) for n, rows in SCENARIOS.items() for s, m, c in rows]


def _name(strategy, method, ckpt):
    return f"{strategy}_{method}_ckpt{ckpt}"


def _over(n, strategy, method, ckpt):
    return {"model": {"name": MODEL}, "hardware": {"gpus_per_node": n}, "run": {"memory_trace": True},
            "train": {"strategy": strategy, "method": method, "grad_ckpt": ckpt, "precision": "fp32",
                      "seq_len": 512, "micro_batch": 1, "global_batch": n, "steps": 2}}


def _launch(base: Path, n: int) -> dict:
    sc = [{"name": _name(*row), "over": _over(n, *row)} for row in SCENARIOS[n]]
    return run_driver(base, sc, nproc=n)


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    return {n: _launch(tmp_path_factory.mktemp(f"peak_truth_{n}"), n) for n in SCENARIOS}


def _measured(res: dict, n: int) -> tuple[int, list[dict]]:
    """The fullest rank's peak without gloo's collective temporaries (see the module docstring)."""
    reps = [json.loads((Path(res["run_dir"]) / f"memory_rank{r}.json").read_text())["memory_trace"]
            for r in range(n)]
    return max(r["no_comm_temp"]["total"] for r in reps), reps


def _plan(res: dict):
    from shardtrain.compiler.plan import Plan
    raw = json.loads((Path(res["run_dir"]) / "plan.json").read_text())
    return Plan.from_json(raw), raw


def _host_resident(plan, phase: str) -> int:
    """What the plan keeps in host memory, live in ``phase``: on CPU the host IS the device, so the tracker
    sees it next to the device terms. fsdp_offload (CPUOffloadPolicy): the sharded params and optimizer
    states all step long, the sharded grads only once the backward has reduce-scattered them (none at the
    backward's peak, its start; all at the step) — fsdp_full_shard's split of the same bytes
    (memory._fsdp_offload_bytes). No other scenario here offloads."""
    from shardtrain.compiler.inventory import tensor_inventory
    from shardtrain.compiler.memory import model_state_bytes
    from shardtrain.compiler.specs import Strategy
    c = plan.chosen
    if c.strategy is not Strategy.FSDP_OFFLOAD:
        return 0
    groups = tensor_inventory(plan.model, c.method, plan.train.lora.rank, plan.lora_targets or plan.train.lora.targets)
    ms = model_state_bytes(plan.model, groups, Strategy.FSDP_FULL_SHARD, plan.hardware, method=c.method,
                           precision=c.precision, optimizer=c.optimizer, parallel=plan.parallel)
    assert ms.params + ms.grads + ms.optimizer_states == plan.runtime.state_bytes.host_bytes
    return ms.params + ms.optimizer_states + (ms.grads if phase == "optimizer" else 0)


def _phases(reps: list[dict]) -> str:
    r = max(reps, key=lambda x: x["no_comm_temp"]["total"])
    nc = r["no_comm_temp"]
    return (", ".join(f"{p} {v['total']:,}" for p, v in nc["per_phase"].items()) + f"; peak {nc['peak_phase']}"
            + f" (with gloo's collective temporaries: {r['total']:,})")


@pytest.mark.parametrize("n,strategy,method,ckpt", PARAMS, ids=[f"w{n}-{_name(s, m, c)}" for n, s, m, c in PARAMS])
def test_measured_peak_matches_plan(truth, n, strategy, method, ckpt):
    res = truth[n][_name(strategy, method, ckpt)]
    measured, reps = _measured(res, n)
    plan, _ = _plan(res)
    # The optimizer kernel is the same here as on CUDA (fused AdamW, runtime/optim.py), so the plan's own
    # phases are the prediction.
    phases = dict(plan.chosen.per_phase)
    per_phase = {p: v.total - v.cuda_context + _host_resident(plan, p) for p, v in phases.items()}
    peak = max(per_phase, key=per_phase.get)
    predicted = per_phase[peak]
    err = (predicted - measured) / measured
    assert -PLAN_UNDER <= err <= PLAN_OVER, (
        f"analytic peak {predicted:,} B (plan - cuda_context, phase {peak}) vs measured "
        f"{measured:,} B: {err:+.1%} (band -{PLAN_UNDER:.0%} / +{PLAN_OVER:.0%}); measured per phase: {_phases(reps)}; "
        f"predicted per phase: {json.dumps(per_phase)}")


TRACEABLE = [p for p in PARAMS if not p[1].startswith("zero") and p[1] != "fsdp_offload"]   # trace/step.py


@pytest.mark.parametrize("n,strategy,method,ckpt", TRACEABLE,
                         ids=[f"w{n}-{_name(s, m, c)}" for n, s, m, c in TRACEABLE])
def test_measured_peak_matches_trace(truth, n, strategy, method, ckpt):
    from shardtrain.trace import trace_plan
    res = truth[n][_name(strategy, method, ckpt)]
    measured, reps = _measured(res, n)
    plan, _ = _plan(res)
    tr = trace_plan(plan).to_json()
    live = traced_live(tr)
    ph = max(live, key=live.get)
    err = (live[ph] - measured) / measured
    assert -TRACE_UNDER <= err <= TRACE_TOL, (
        f"trace peak of live tensors {live[ph]:,} B ({ph}; trace total {tr['total']:,} B minus the untraced "
        f"{tr['untraced']}) vs measured {measured:,} B: {err:+.1%} (band -{TRACE_UNDER:.0%} / +{TRACE_TOL:.0%}); "
        f"measured per phase: {_phases(reps)}; traced per phase: {json.dumps(live)}")


def traced_live(tr: dict) -> dict:
    """The trace's live-tensor bytes per phase: its total minus the terms it takes from the analytic
    model because no tensor shows them under FakeTensorMode (tr["untraced"]: cuda_context, DDP buckets). The real tracker counts real tensors only, so this is like for like."""
    return {p: v["total"] - sum(int(v.get(u, 0)) for u in tr["untraced"]) for p, v in tr["per_phase"].items()}


def test_memory_table_has_the_trace(truth):
    res = truth[2][_name("ddp", "full", "none")]
    table = (Path(res["run_dir"]) / "logs" / "memory_table.txt").read_text()
    for word in ("MemTracker", "forward", "backward", "optimizer", "logits", "total (no cuda_context)"):
        assert word in table, table
    rec = json.loads((Path(res["run_dir"]) / "memory_rank0.json").read_text())["memory_trace"]
    assert set(rec["per_phase"]) == {"forward", "backward", "optimizer"}
    # the real categories add up to the total at each phase's peak
    for ph, v in rec["per_phase"].items():
        assert sum(v["terms"][t] for t in v["terms"] if t != "total") == v["total"], ph


def _png_ok(path: Path) -> None:
    """A decodable PNG with real content: a plot, not a blank canvas."""
    import matplotlib.image as mpimg
    import numpy as np
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600, img.shape
    rgb = (img[..., :3] * 255).astype(int)
    colours = {tuple(c) for c in rgb.reshape(-1, 3)[::7]}
    assert len(colours) > 50, "PNG looks blank"
    # the predicted-peak line (tab:red #d62728) and the measured bars/lines (tab:blue #1f77b4) are drawn
    for want in ((0xd6, 0x27, 0x28), (0x1f, 0x77, 0xb4)):
        assert (np.abs(rgb - np.array(want)).sum(-1) < 30).sum() > 100, f"no pixels of colour {want}"


def test_report_command(truth, tmp_path, capsys):
    """`shardtrain report RUN_DIR` on a real run directory: per-phase table and a PNG."""
    from shardtrain.cli import main
    d = Path(truth[2][_name("fsdp_full_shard", "full", "full")]["run_dir"])
    png = tmp_path / "mem.png"
    assert main(["report", str(d), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    for word in ("forward", "backward", "optimizer", "MemTracker peak", "process RSS", "vs plan"):
        assert word in out, out
    _png_ok(png)
    assert main(["report", str(d), "--json", "--png", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)["phases"]
    reps = [json.loads((d / f"memory_rank{r}.json").read_text())["memory_trace"] for r in (0, 1)]
    for row in rows:  # the table is the fullest rank's MemTracker peak per phase (without gloo's temporaries)
        assert row["memtracker_live"] == max(r["no_comm_temp"]["per_phase"][row["phase"]]["total"] for r in reps)
    assert rows[1]["memtracker_with_comm"] > rows[1]["memtracker_live"]  # backward: gloo's reduce-scatter copy


def test_report_cuda_records(truth, tmp_path, capsys):
    """CUDA runs record torch.cuda max_memory_allocated / reserved per phase (telemetry.PhaseMemory);
    no GPU here, so those records are written in that format into a copy of a real run directory."""
    import shutil
    from shardtrain.cli import main
    src = Path(truth[1][_name("ddp", "full", "full")]["run_dir"])
    d = tmp_path / "run"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("checkpoints", "final"))
    recs = []
    for i in range(1, 6):
        snaps = ("after_forward", "after_backward", "after_step")
        mem = {ph: {"allocated": (1 + k) << 30, "max_allocated": ((2 + k) << 30) + i * (1 << 26),
                    "reserved": (4 + k) << 30} for k, ph in enumerate(snaps)}
        recs.append({"kind": "train", "step": i, "loss": 1.0, "memory": mem})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = tmp_path / "cuda.png"
    assert main(["report", str(d), "--png", str(png), "--json"]) == 0
    rows = {r["phase"]: r for r in json.loads(capsys.readouterr().out)["phases"]}
    assert rows["optimizer"]["cuda_max_allocated"] == (4 << 30) + 5 * (1 << 26)
    assert rows["forward"]["cuda_reserved"] == 4 << 30
    _png_ok(png)
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "no plan.json" in capsys.readouterr().err
