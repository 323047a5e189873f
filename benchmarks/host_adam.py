"""The host optimizer step of the two CPU-offload strategies (issue 19): DeepSpeedCPUAdam (ZeRO-Offload:
zero2_offload, zero3_opt_offload, zero3_offload) against torch's own AdamW on CPU tensors (fsdp_offload:
FSDP2's CPUOffloadPolicy steps the optimizer the runtime builds, runtime/optim.py: fused when every param is
on a fused device, the CPU included) and torch's per-tensor loop. Prints seconds per step (best of ROUNDS,
interleaved) and the ratios that compiler/cost.py TORCH_CPU_ADAM_SLOWDOWN stands on.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/host_adam.py [--params 8e6] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

ROUNDS = 5


def main() -> None:
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=8e6)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = int(a.params)

    def param():
        p = torch.nn.Parameter(torch.randn(n))
        p.grad = torch.randn(n)
        return p
    opts = {"DeepSpeedCPUAdam": DeepSpeedCPUAdam([param()], lr=1e-3, adamw_mode=True),
            "torch AdamW fused": torch.optim.AdamW([param()], lr=1e-3, fused=True),
            "torch AdamW for-loop": torch.optim.AdamW([param()], lr=1e-3, foreach=False)}
    best = {k: float("inf") for k in opts}
    for _ in range(ROUNDS):
        for k, o in opts.items():
            t = time.perf_counter()
            o.step()
            best[k] = min(best[k], time.perf_counter() - t)
    ds = best["DeepSpeedCPUAdam"]
    print(f"{n:,} fp32 params, {a.threads} thread(s), best of {ROUNDS}")
    for k, v in best.items():
        print(f"  {k:22s} {v * 1e3:8.1f} ms   {v / ds:5.2f}x DeepSpeedCPUAdam   {n / v / 1e6:7.0f} M params/s")


if __name__ == "__main__":
    main()
