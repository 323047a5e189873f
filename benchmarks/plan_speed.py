"""Planning speed: in-process plans over all candidates, the device mesh searched (issue 18): 70B on 64
nodes × 8 GPUs (goal < 0.2 s), 405B on 1,024 GPUs with a global batch of 256 (goal < 50 ms; the batch
forces tp/cp), 8B at seq 262,144 on one node; `plan --max seq-len` for 8B on one node (goal < 1 s) and 405B on
128 x 8 (goal < 5 s); and a cold `shardtrain plan` CLI call with a preset (goal
< 2 s wall). Prints measured figures (wall and, for the in-process ones, this process's CPU time: on a
shared, loaded machine the CPU time is the figure to compare) and the load average; asserts nothing.

    python benchmarks/plan_speed.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")

    from shardtrain.compiler.planner import plan
    from shardtrain.compiler.specs import HardwareSpec, TrainSpec
    from shardtrain.config.presets import load_model_spec

    model = load_model_spec("llama-3.1-70b")
    hw = HardwareSpec(nodes=64, gpus_per_node=8, nvme_path="/nvme", nvme_capacity_bytes=3_500_000_000_000)
    train = TrainSpec(seq_len=4096, global_batch_size=2048)
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        p = plan(model, hw, train)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    n_alt = len(p.alternatives)
    print(f"in-process plan, 70B on 64x8 GPUs: median {statistics.median(times) * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}; CPU median {statistics.median(cpu) * 1e3:.1f} ms; "
          f"goal < 200 ms) -> {p.chosen.strategy.value}, "
          f"mesh {p.parallel.label()}, {n_alt} alternatives; ratio to goal {statistics.median(times) / 0.2:.3f}")
    for name, hw_, train_, goal in (
            ("405B, global batch 256 on 128x8 GPUs", HardwareSpec(nodes=128, gpus_per_node=8),
             TrainSpec(seq_len=8192, global_batch_size=256), 0.05),
            ("8B at seq 262,144, global batch 1 on 1x8 GPUs", HardwareSpec(nodes=1, gpus_per_node=8),
             TrainSpec(seq_len=262_144, global_batch_size=1), 0.05)):
        m = load_model_spec("llama-3.1-405b" if name.startswith("405B") else "llama-3.1-8b")
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            p = plan(m, hw_, train_)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        med = statistics.median(times)
        print(f"in-process plan, {name}: median {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}; CPU median "
              f"{statistics.median(cpu) * 1e3:.1f} ms; goal "
              f"< {goal * 1e3:.0f} ms) -> {p.chosen.strategy.value}, mesh {p.parallel.label()}; ratio to goal "
              f"{med / goal:.3f}")

    cmd = [sys.executable, "-m", "shardtrain", "plan", "--model", "llama-3.1-8b", "--gpus-per-node", "8", "--json"]
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
    print(f"cold CLI `shardtrain plan --model llama-3.1-8b --json`: median {statistics.median(walls):.3f} s "
          f"(min {min(walls):.3f}, max {max(walls):.3f}; goal < 2 s); ratio to goal {statistics.median(walls) / 2:.3f}")
    heavy = subprocess.run([sys.executable, "-X", "importtime", "-m", "shardtrain", "plan", "--model",
                            "llama-3.1-8b", "--json"], capture_output=True, text=True).stderr
    bad = [m for m in ("torch", "deepspeed", "transformers") if f"| {m}\n" in heavy or f"| {m}." in heavy]
    print(f"heavy modules imported on the plan path: {bad or 'none'}")
    _max_speed(args.repeats)


def _max_speed(repeats: int) -> None:
    """issue 20: `plan --max seq-len` in-process (goals: 8B on one node < 1 s, 405B on 128 x 8 < 5 s)."""
    from shardtrain.compiler.maxfit import MaxKey, find_max
    from shardtrain.compiler.specs import HardwareSpec, TrainSpec
    from shardtrain.config.presets import load_model_spec
    for name, hw, goal in (("llama-3.1-8b", HardwareSpec(nodes=1, gpus_per_node=8), 1.0),
                           ("llama-3.1-405b", HardwareSpec(nodes=128, gpus_per_node=8), 5.0)):
        m, times, cpu = load_model_spec(name), [], []
        for _ in range(max(1, repeats // 2)):
            t0, c0 = time.perf_counter(), time.process_time()
            r = find_max(m, hw, TrainSpec(), MaxKey.SEQ_LEN)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        med = statistics.median(times)
        print(f"in-process plan --max seq-len, {name} on {hw.nodes}x{hw.gpus_per_node}: median {med:.3f} s "
              f"(min {min(times):.3f}; CPU median {statistics.median(cpu):.3f} s, min {min(cpu):.3f}; goal < "
              f"{goal:.0f} s; {r.plans_made} plans) -> seq {r.value:,}, mesh "
              f"{r.plan.parallel.label()}, limited by {r.limited_by}; ratio to goal {med / goal:.3f}")


if __name__ == "__main__":
    main()
