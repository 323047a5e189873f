"""HF's own loss step vs the plan, per runner: `model(input_ids, labels=...)` (the Trainer / accelerate
path) traced under FSDP2 (each decoder layer + root, as accelerate wraps it) with torch's FSDPMemTracker
under FakeTensorMode on a fake process group (shardtrain/trace), against the plan made for our runtime
(train.runner shardtrain) and for accelerate (compiler/runner.py).

    .venv/bin/python benchmarks/runner_trace.py [--model llama-3.2-1b] [--world 8] [--seq 2048] [--ckpt full]

Prints the traced peak and each plan's error (both without the untraced cuda_context). Results:
benchmarks/results/runner_trace.md.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--ckpt", default="full")
    args = ap.parse_args()
    from shardtrain.compiler.planner import plan
    from shardtrain.compiler.specs import GradCkpt, HardwareSpec, LossMode, Runner, Strategy, TrainSpec
    from shardtrain.config.presets import load_model_spec
    from shardtrain.trace import trace_plan
    m = load_model_spec(args.model)
    hw = HardwareSpec(gpus_per_node=args.world)
    plans = {r: plan(m, hw, TrainSpec(seq_len=args.seq, micro_batch_size=1, global_batch_size=args.world,
                                      strategy=Strategy.FSDP_FULL_SHARD, grad_ckpt=GradCkpt(args.ckpt),
                                      loss=LossMode.FULL, runner=r))
             for r in (Runner.SHARDTRAIN, Runner.ACCELERATE)}
    res = trace_plan(plans[Runner.ACCELERATE])     # traces HF's loss (trace/step.py) for the HF runners
    untraced = sum(res.per_phase[res.peak_phase].get(k, 0) for k in res.untraced)
    traced = res.total - untraced
    print(f"{args.model}, FSDP2 world {args.world}, seq {args.seq}, micro 1, checkpointing {args.ckpt}, bf16")
    print(f"HF step traced ({res.tool}, peak {res.peak_phase}): {traced:,} B")
    for r, p in plans.items():
        planned = p.chosen.per_gpu.total - untraced
        print(f"plan for runner {r.value:<11}: {planned:,} B  error {100 * (planned - traced) / traced:+.2f}%")


if __name__ == "__main__":
    main()
