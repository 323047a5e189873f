"""benchmarks/gpu_memory.py cannot rot: its --dry-run runs the whole grid on CPU (tiny model, the
project's worker, same code path as on a GPU) and prints predicted vs measured for every row."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRY_UNDER, DRY_OVER = 0.15, 0.20
"""Dry-run band on the tiny model: plan peak at most 15% below / 20% above the measured peak."""


@pytest.mark.multiproc
def test_gpu_memory_dry_run(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_memory.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(out.read_text())
    rows = {r["row"]: r for r in res["rows"]}
    from importlib.util import find_spec
    for name, r in rows.items():
        if "skipped" in r:  # only when the optional package really is absent
            assert "not installed" in r["skipped"] and any(find_spec(m) is None for m in ("deepspeed", "bitsandbytes"))
            continue
        assert set(r["measured"]) == {"forward", "backward", "optimizer"}, name
        for ph, m in r["measured"].items():
            assert m["memtracker_live"] > 0, (name, ph)
        assert r["predicted"], name
    # the numbers must mean something (issue 19: this passed at +521%): the plan's peak (minus
    # cuda_context, which no tensor holds) against the measured peak over the phases. The band is wide
    # because the tiny model (64 tokens) is all fixed costs, which the truth tests at a realistic size
    # check tightly (tests/runtime/test_peak_truth.py); measured here: -14.3% (qlora_ckpt) .. +14.7% (zero2)
    errs = {}
    for name, r in rows.items():
        if "skipped" in r:
            continue
        pk = r["predicted"][r["peak_phase"]]
        predicted = pk["total"] - pk.get("cuda_context", 0)
        measured = max(m["memtracker_live"] for m in r["measured"].values())
        errs[name] = (predicted - measured) / measured
    assert errs and all(-DRY_UNDER <= e <= DRY_OVER for e in errs.values()), {k: f"{e:+.1%}" for k, e in errs.items()}
    assert {"single_full", "fsdp2_full_ckpt", "lora_ckpt"} <= set(rows)
    for name in rows:
        assert name in proc.stdout
    assert "dry run" in proc.stdout


def _bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_memory_bench", ROOT / "benchmarks" / "gpu_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cuda_phase_peaks_and_table(monkeypatch):
    """The CUDA branch without a GPU: torch.cuda's peak counters are replaced by a fake allocator
    (the one thing that cannot exist here); PhasePeaks must reset the peak at each phase boundary
    and keep each phase's own maximum, and the table must print predicted vs measured."""
    import types
    import torch
    bench = _bench()
    state = {"alloc": 100, "peak": 100, "reserved": 1000}

    def alloc(n):
        state["alloc"] += n
        state["peak"] = max(state["peak"], state["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: state["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=state["alloc"]))

    eng = types.SimpleNamespace()
    eng.forward = lambda b: (alloc(50), alloc(-20))[0]        # forward peak = base + 50
    eng.backward = lambda loss, last: (alloc(80), alloc(-30))[0]  # backward peak = after fwd + 80
    eng.step = lambda lr: (alloc(10), alloc(-40))[0]
    peaks = bench.PhasePeaks(cuda=True)
    peaks.install(types.SimpleNamespace(engine=eng))
    for _ in range(2):
        eng.forward({})
        eng.backward(None, True)
        eng.step(0.1)
    s1, s2 = peaks.steps
    assert s1 == {"forward": {"max_allocated": 150, "reserved": 1000},
                  "backward": {"max_allocated": 210, "reserved": 1000},
                  "optimizer": {"max_allocated": 190, "reserved": 1000}}
    assert s2["forward"]["max_allocated"] == 200 and s2["backward"]["max_allocated"] == 260  # step 1 left 50 B allocated
    pred = {ph: {"total": 300, "cuda_context": 100} for ph in ("forward", "backward", "optimizer")}
    row = {"row": "single_full", "predicted": pred, "peak_phase": "backward",
           "measured": {ph: v for ph, v in s2.items()}}
    table = bench.render([row, {"row": "qlora_ckpt", "skipped": "bitsandbytes not installed"}])
    assert "single_full" in table and "backward*" in table and "-23.1%" in table  # (300 - 100 - 260) / 260
    assert "skipped: bitsandbytes not installed" in table
