"""Issue 18 acceptance: `shardtrain plan --trace` for an 8B model on a 2-D mesh agrees with the analytic
peak. Runs the real CLI (llama-3.1-8b preset, 1 node × 8 H100, fsdp_full_shard, every other setting the
planner's), traces one plan per mesh under FakeTensorMode on the CPU (shardtrain/trace/mesh.py: DTensor
TP with Llama's own TP plan, FSDP2 over dp_shard × cp, HSDP, Ulysses), and compares like for like:
the analytic per-GPU peak and the traced peak, both without the terms the trace takes from the
analytic model (`untraced`: cuda_context).

    python benchmarks/trace_mesh_8b.py                 # tp 2 × dp_shard 4 (the acceptance; ~1-2 min on 2 cores)
    python benchmarks/trace_mesh_8b.py --all           # + HSDP 2 × 4, tp 2 × dp_replicate 4, Ulysses cp 2 × dp_shard 4
    python benchmarks/trace_mesh_8b.py --grad-ckpt full --micro-batch 1

Exit status 1 when a ratio analytic/traced is outside [0.98, 1.10] (the analytic peak may not be
below the traced one by more than 2%: that would be an OOM the plan did not predict).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
MESHES = {"tp2xdp_shard4": ["--tp", "2", "--dp-shard", "4"],
          "dp_replicate2xdp_shard4": ["--dp-replicate", "2", "--dp-shard", "4", "--tp", "1", "--cp", "1"],
          "tp2xdp_replicate4": ["--tp", "2", "--dp-replicate", "4", "--dp-shard", "1"],
          "ulysses2xdp_shard4": ["--cp", "2", "--cp-mode", "ulysses", "--dp-shard", "4", "--tp", "1"]}
LOW, HIGH = 0.98, 1.10


def run(mesh: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "shardtrain", "plan", "--model", "llama-3.1-8b", "--gpus-per-node", "8",
           "--strategy", "fsdp_full_shard", *MESHES[mesh], *extra, "--trace", "--json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode not in (0, 2):     # 2: no fit (still traced)
        raise SystemExit(f"{mesh}: {' '.join(cmd[1:])} failed: {r.stderr.strip().splitlines()[-1:]}")
    d = json.loads(r.stdout)
    if "trace" not in d:
        raise SystemExit(f"{mesh}: no trace in the output: {d.get('trace_error') or r.stderr.strip()[-300:]}")
    tr = d["trace"]
    untraced = sum(tr["per_phase"][tr["peak_phase"]].get(k, 0) for k in tr["untraced"])
    analytic, traced = d["per_gpu"]["total"] - untraced, tr["total"] - untraced
    return {"mesh": mesh, "cmd": " ".join(["python", *cmd[1:]]), "micro_batch": d["micro_batch_size"],
            "ckpt": d["gradient_checkpointing"], "seq": d["seq_len"], "analytic": analytic, "traced": traced,
            "ratio": analytic / traced, "analytic_peak": d["peak_phase"], "traced_peak": tr["peak_phase"],
            "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="also HSDP, tp × dp_replicate and Ulysses meshes")
    ap.add_argument("--grad-ckpt", help="forwarded to plan (default: the planner's choice)")
    ap.add_argument("--micro-batch", help="forwarded to plan (default: the planner's choice)")
    a = ap.parse_args()
    extra = [*(["--grad-ckpt", a.grad_ckpt] if a.grad_ckpt else []),
             *(["--micro-batch", a.micro_batch] if a.micro_batch else [])]
    bad = 0
    print(f"{'mesh':<26}{'mb':>3} {'ckpt':<10}{'analytic':>11}{'traced':>11}{'ratio':>8}  peak (analytic/traced)  seconds")
    for mesh in (MESHES if a.all else ["tp2xdp_shard4"]):
        r = run(mesh, extra)
        ok = LOW <= r["ratio"] <= HIGH
        bad += not ok
        print(f"{mesh:<26}{r['micro_batch']:>3} {r['ckpt']:<10}{r['analytic'] / GiB:>9.2f}G{r['traced'] / GiB:>9.2f}G"
              f"{r['ratio']:>8.3f}  {r['analytic_peak']}/{r['traced_peak']}  {r['seconds']:.0f}"
              f"{'' if ok else '  OUTSIDE [0.98, 1.10]'}")
        print(f"    {r['cmd']}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
