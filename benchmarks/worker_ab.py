"""A/B of shardtrain's own worker: the same job with one runtime or plan choice changed, in one run.

    python benchmarks/worker_ab.py --case tiny --strategy ddp --variants default,unbound [--rounds 4] [--record]
    python benchmarks/worker_ab.py --case compute --strategy zero2 --variants default,h2-buckets --steps 12 --skip 3

The jobs are those of benchmarks/runtime_vs_accelerate.py (tiny: configs/examples/tiny-cpu.yaml; compute:
the 26M-parameter Llama at seq 512). Variants:
  default      the run dir as `shardtrain launch` prepares it
  unbound      run.bind_cpu_cores=false: ranks not bound to their own cores (runtime/dist.py)
  h2-buckets   ZeRO reduce/all-gather buckets at HF's h² instead of the plan's (compiler/memory.py
               ZeroBuckets); the run dir's ds_config.json and plan.json are rewritten alike
Each variant gets its own run dir; the variants run alternately (--rounds times, the order reversed
every other round) under bare torchrun, 2 gloo processes. Step time = wall time from one step's end to
the next (metrics.jsonl unix_time_s), the steps after --skip of every round pooled per variant. Prints
median and p10 step time per variant and the ratio to the first variant (< 1: faster). --record
appends the table, command and versions to benchmarks/results/worker_ab.md. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from profile_step import CASES  # noqa: E402  (the jobs as run-config overrides)
from runtime_vs_accelerate import CONFIG, ENV, RESULTS, versions  # noqa: E402

VARIANTS = ("default", "unbound", "h2-buckets")


def _prepare(variant: str, case: str, strategy: str, steps: int, work: Path) -> Path:
    from shardtrain.launcher.rundir import prepare_run_dir
    run_dir = work / variant
    sets = {**CASES[case], "train.steps": steps, "train.strategy": strategy, "run.eval_every": 0,
            "run.checkpoint_every": 0, "run.resume": "never", "run.bind_cpu_cores": variant != "unbound"}
    prepare_run_dir(str(CONFIG), sets, run_dir)
    if variant == "h2-buckets":
        plan = json.loads((run_dir / "plan.json").read_text())
        ds = plan["runtime"]["deepspeed"]
        if not ds:
            raise SystemExit(f"worker_ab: h2-buckets needs a DeepSpeed strategy, not {strategy}")
        h = plan["spec"]["model"]["hidden_size"]
        for k in ("reduce_bucket_size", "allgather_bucket_size"):
            ds["zero_optimization"][k] = h * h
        (run_dir / "plan.json").write_text(json.dumps(plan, indent=1))
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))  # the ranks refuse a differing copy
    return run_dir


def _run(run_dir: Path, log: Path) -> list[float]:
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "shardtrain.runtime.worker", "--run-dir", str(run_dir)]
    with open(log, "w") as f:
        rc = subprocess.run(["timeout", "-k", "10", "900", *cmd], stdout=f, stderr=subprocess.STDOUT, env=ENV,
                            cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"worker_ab: {run_dir.name} failed ({rc}):\n" + "\n".join(log.read_text().splitlines()[-20:]))
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    t = [r["unix_time_s"] for r in recs if r.get("kind", "train") == "train"]
    return [b - a for a, b in zip(t, t[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), default="tiny")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--variants", default="default,unbound", help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="first steps of each round left out (warm-up)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--record", action="store_true", help="append the result to benchmarks/results/worker_ab.md")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"worker_ab: --variants {','.join(bad)} unknown; use {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="shardtrain-ab-"))
    t0 = time.time()
    try:
        dirs = {v: _prepare(v, args.case, args.strategy, args.steps, work) for v in variants}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for i in range(args.rounds):
            for v in (variants if i % 2 == 0 else variants[::-1]):
                times[v] += _run(dirs[v], work / f"{v}-{i}.log")[max(args.skip - 1, 0):]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times[variants[0]])
    rows = []
    for v in variants:
        med, p10 = statistics.median(times[v]), statistics.quantiles(times[v], n=10)[0]
        rows.append(f"| {v} | {len(times[v])} | {med * 1e3:.1f} | {p10 * 1e3:.1f} | {med / base:.3f} |")
    table = ["| variant | steps pooled | median step (ms) | p10 step (ms) | median vs first |", "|---|---|---|---|---|",
             *rows]
    print("\n".join(table))
    if args.record:
        v = versions()
        cmd = " ".join(["python benchmarks/worker_ab.py", *sys.argv[1:]])
        with open(RESULTS / "worker_ab.md", "a") as f:
            f.write(f"\n## {args.case} / {args.strategy}: {', '.join(variants)}\n\n"
                    f"`{cmd}`, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {time.time() - t0:.0f} s; {v['cores']} cores "
                    f"({v['cpu']}), torch {v['torch']}, deepspeed {v['deepspeed']}.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
