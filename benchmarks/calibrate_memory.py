"""Calibration grid: the analytic phase model (compiler/phases.py) vs `shardtrain plan --trace`
(issue 8). Every point is planned, traced under FakeTensorMode on the CPU with PyTorch's own
MemTracker / FSDPMemTracker (shardtrain.trace), and compared like for like: the analytic per-GPU
peak and the traced peak, both WITHOUT the terms the trace takes from the analytic model
(`untraced`: cuda_context, DDP's reducer buckets).

    python benchmarks/calibrate_memory.py                   # full grid (~10-15 min on 2 cores)
    python benchmarks/calibrate_memory.py --quick           # 6 points (~1-2 min)
    python benchmarks/calibrate_memory.py --terms           # also the terms at the peak, both sides
    python benchmarks/calibrate_memory.py --out benchmarks/results/calibrate_memory.md

Prints one row per point (per-phase analytic/traced ratio, peak error) and the worst / median error.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shardtrain.compiler.model import ModelSpec  # noqa: E402
from shardtrain.compiler.planner import NoFitError, plan  # noqa: E402
from shardtrain.compiler.specs import (GradCkpt, HardwareSpec, Method, ParallelRequest, Precision,  # noqa: E402
                                       Strategy, TrainSpec)
from shardtrain.config.presets import load_model_spec  # noqa: E402

GiB = 2**30
SMALL = str(ROOT / "tests" / "fixtures" / "models" / "small-llama-32k.json")


def model(name: str) -> ModelSpec:
    if name == "llama-110m":   # GPT-2-small-sized Llama (12 x 768, vocab 32k)
        return ModelSpec.build(name="llama-110m", model_type="llama", hidden_size=768, num_layers=12, num_heads=12,
                               num_kv_heads=12, intermediate_size=2048, vocab_size=32000,
                               decoder_layer_class="LlamaDecoderLayer")
    return load_model_spec(SMALL if name == "small-llama-32k" else name)


# (model, strategy, nodes, gpus_per_node, seq, micro, ckpt, method, precision)
GRID = [
    ("small-llama-32k", "ddp", 1, 1, 512, 1, "none", "full", "fp32"),
    ("small-llama-32k", "fsdp_full_shard", 1, 2, 512, 1, "full", "lora", "fp32"),
    ("llama-110m", "ddp", 1, 1, 512, 8, "none", "full", "bf16"),
    ("llama-110m", "ddp", 1, 8, 8192, 1, "full", "lora", "bf16"),
    ("llama-110m", "fsdp_full_shard", 1, 8, 2048, 4, "none", "full", "bf16"),
    ("llama-110m", "fsdp_shard_grad_op", 1, 8, 2048, 2, "full", "full", "bf16"),
    ("llama-3.2-1b", "ddp", 1, 1, 1024, 2, "none", "full", "bf16"),
    ("llama-3.2-1b", "ddp", 1, 8, 4096, 1, "full", "lora", "bf16"),
    ("llama-3.2-1b", "fsdp_full_shard", 1, 8, 2048, 4, "full", "full", "bf16"),
    ("llama-3.2-1b", "fsdp_full_shard", 1, 2, 8192, 1, "none", "lora", "bf16"),
    ("llama-3.2-1b", "fsdp_hybrid_shard", 2, 8, 2048, 2, "none", "full", "bf16"),
    ("llama-3.2-3b", "fsdp_full_shard", 1, 8, 4096, 1, "none", "full", "bf16"),
    ("llama-3.2-3b", "fsdp_shard_grad_op", 1, 8, 2048, 2, "full", "lora", "bf16"),
    ("llama-3.1-8b", "fsdp_full_shard", 1, 8, 2048, 1, "none", "full", "bf16"),
    ("llama-3.1-8b", "fsdp_full_shard", 1, 8, 2048, 1, "none", "lora", "bf16"),
    ("llama-3.1-8b", "fsdp_full_shard", 8, 8, 4096, 2, "full", "full", "bf16"),
    ("llama-3.1-8b", "fsdp_full_shard", 4, 8, 8192, 1, "full", "lora", "bf16"),
    ("llama-3.1-8b", "ddp", 1, 1, 512, 1, "full", "lora", "bf16"),
    ("mixtral-8x7b", "fsdp_full_shard", 1, 8, 2048, 1, "full", "full", "bf16"),
    ("mixtral-8x7b", "fsdp_full_shard", 8, 8, 4096, 1, "none", "full", "bf16"),
    # device-mesh points (issue 18): traced with DTensor TP / HSDP / Ulysses on the fake process group
    ("llama-3.1-8b", "fsdp_full_shard", 1, 8, 4096, 2, "none", "full", "bf16", dict(tp=2, dp_shard=4)),
    ("llama-3.1-8b", "fsdp_full_shard", 1, 8, 4096, 1, "none", "full", "bf16", dict(dp_replicate=2, dp_shard=4)),
    ("llama-3.1-8b", "fsdp_full_shard", 1, 8, 4096, 2, "none", "full", "bf16", dict(cp=2, dp_shard=4)),
    ("llama-3.2-1b", "fsdp_full_shard", 1, 4, 2048, 2, "full", "lora", "bf16", dict(tp=2, dp_shard=2)),
]
QUICK = [GRID[i] for i in (0, 1, 2, 6, 9, 13)]


def _mesh(row) -> ParallelRequest:
    """The row's forced mesh; rows without one are 1-D (tp 1, cp 1, no HSDP unless the strategy spells it),
    as the grid measured before the planner searched meshes."""
    if len(row) > 9:
        return ParallelRequest(**{"tp": 1, "cp": 1, "dp_replicate": 1, **row[9]})
    return ParallelRequest(tp=1, cp=1, dp_replicate=1 if row[1].startswith("fsdp_full") or
                           row[1].startswith("fsdp_shard") else None)


def make_plan(row):
    name, strategy, nodes, gpus, seq, mb, ckpt, method, precision = row[:9]
    p = _mesh(row)
    world = nodes * gpus
    dp = world // ((p.tp or 1) * (p.cp or 1))
    t = TrainSpec(seq_len=seq, micro_batch_size=mb, global_batch_size=mb * dp, strategy=Strategy(strategy),
                  grad_ckpt=GradCkpt(ckpt), method=Method(method), precision=Precision(precision), parallel=p)
    hw = HardwareSpec(nodes=nodes, gpus_per_node=gpus, gpu_memory_bytes=10**4 * GiB)
    try:
        return plan(model(name), hw, t)
    except NoFitError as e:
        return e.plan


def measure(row, terms: bool) -> dict:
    from shardtrain.trace import trace_plan
    p = make_plan(row)
    res = trace_plan(p)
    unt = {ph: sum(d.get(k, 0) for k in res.untraced) for ph, d in res.per_phase.items()}
    a = {ph: b.total - unt[ph] for ph, b in p.chosen.per_phase}
    t = {ph: d["total"] - unt[ph] for ph, d in res.per_phase.items()}
    out = {"row": row, "analytic": a, "traced": t, "a_peak": max(a.values()), "t_peak": max(t.values()),
           "a_phase": p.chosen.peak_phase, "t_phase": res.peak_phase, "seconds": res.seconds}
    out["err"] = (out["a_peak"] - out["t_peak"]) / out["t_peak"]
    if terms:
        out["a_terms"] = {k: v for k, v in p.chosen.per_gpu.to_json().items() if v and k != "total"}
        out["t_terms"] = {k: v for k, v in res.by_category.items() if v}
    return out


def fmt_row(r) -> str:
    name, strategy, nodes, gpus, seq, mb, ckpt, method, precision = r["row"][:9]
    if len(r["row"]) > 9:
        strategy += " " + " × ".join(f"{k} {v}" for k, v in r["row"][9].items())
    ratios = " ".join(f"{ph[:3]} {r['analytic'][ph] / r['traced'][ph]:.3f}" for ph in ("forward", "backward", "optimizer"))
    return (f"| {name} | {strategy} | {nodes}x{gpus} | {seq} | {mb} | {ckpt} | {method} | {precision} | "
            f"{r['a_peak'] / GiB:.3f} ({r['a_phase'][:3]}) | {r['t_peak'] / GiB:.3f} ({r['t_phase'][:3]}) | "
            f"{100 * r['err']:+.1f}% | {ratios} | {r['seconds']:.0f} |")


HEADER = ("| model | strategy | nodes x gpus | seq | micro | ckpt | method | precision | analytic GiB (phase) | "
          "traced GiB (phase) | peak error | analytic/traced per phase | trace s |\n" + "|---" * 13 + "|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 points instead of the full grid")
    ap.add_argument("--terms", action="store_true", help="also print the terms / categories at the peak")
    ap.add_argument("--out", type=Path, help="write the markdown table (with command and versions) here")
    args = ap.parse_args(argv)
    import torch
    import transformers
    rows = QUICK if args.quick else GRID
    t0 = time.perf_counter()
    results = []
    print(HEADER, flush=True)
    for row in rows:
        r = measure(row, args.terms)
        results.append(r)
        print(fmt_row(r), flush=True)
        if args.terms:
            print(f"|   analytic terms: {r['a_terms']}\n|   traced categories: {r['t_terms']}")
    errs = [abs(r["err"]) for r in results]
    summary = (f"{len(results)} points, worst |error| {100 * max(errs):.1f}%, median |error| "
               f"{100 * statistics.median(errs):.1f}%, {time.perf_counter() - t0:.0f} s")
    print(summary)
    if args.out:
        cmd = "python benchmarks/calibrate_memory.py" + (" --quick" if args.quick else "")
        args.out.write_text(
            "# Analytic phase model vs FakeTensor trace (issue 8)\n\n"
            f"Command: `{cmd}` ({datetime.date.today().isoformat()}, {platform.machine()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}).\n\n"
            "Compared like for like: the plan's per-GPU peak and the traced per-rank peak of live tensors, both "
            "without the terms the trace takes from the analytic model (cuda_context, DDP reducer buckets). "
            "Error = (analytic - traced) / traced.\n\n"
            + HEADER + "\n" + "\n".join(fmt_row(r) for r in results) + f"\n\n{summary}\n")
    return 0 if max(errs) <= 0.10 and statistics.median(errs) <= 0.03 else 1


if __name__ == "__main__":
    sys.exit(main())
