"""Profile optimizer steps of shardtrain's runtime and of accelerate + the HF Trainer on the same job.

    python benchmarks/profile_step.py [--case compute|tiny] [--strategy ddp|zero2] [--steps 8] [--at 4] [--count 3]

Both sides train the job of benchmarks/runtime_vs_accelerate.py (same run dir: model, data, micro batch,
accumulation, lr schedule, clipping, fp32, 2 gloo processes). On rank 0, optimizer steps --at ..
--at+--count-1 run under torch.profiler (CPU activities): shardtrain's through a wrapper around
`shardtrain.runtime.worker.train_step` (benchmarks/_profiled_worker.py), the Trainer's through a
callback (benchmarks/hf_trainer_side.py --profile-out). Prints, per side, the self-CPU time per
profiled step of the ops that cost most, then the ops whose time differs most between the sides (ms
per step, shardtrain minus Trainer): that is where a gap in benchmarks/runtime_vs_accelerate.py comes
from. Profiling adds overhead to both sides alike; compare the sides, not absolute times. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from runtime_vs_accelerate import BIN, CONFIG, ENV, FSDP_ACC  # noqa: E402  (same job, same environment)

# the cases of runtime_vs_accelerate.py as run-config overrides (prepare_run_dir takes dotted keys)
CASES = {"tiny": {},
         "compute": {"model.name": str(ROOT / "benchmarks" / "models" / "bench-llama-26m.json"),
                     "train.seq_len": 512, "train.global_batch": 4, "train.grad_ckpt": "none",
                     "train.loss": "full"}}


def _launch(cmd: list[str], log: Path, env: dict) -> None:
    with open(log, "w") as f:
        rc = subprocess.run(["timeout", "-k", "10", "900", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"profile_step: {' '.join(cmd[:4])} ... exit code {rc}:\n{tail}")


def _table(ops: dict[str, dict], top: int) -> str:
    rows = sorted(ops.items(), key=lambda kv: -kv[1]["self_ms"])[:top]
    return "\n".join(f"  {v['self_ms']:9.2f} ms  {v['calls']:7.1f}x  {k}" for k, v in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), default="compute")
    ap.add_argument("--strategy", default="ddp", help="ddp or zero2 (the Trainer side: DDP or DeepSpeed ZeRO-2)")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    ap.add_argument("--at", type=int, default=4, help="first profiled step (0-based; after the warm-up)")
    ap.add_argument("--count", type=int, default=3, help="profiled steps (times are per step)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", type=Path, help="also write both op tables as JSON here")
    args = ap.parse_args()

    from shardtrain.launcher.rundir import prepare_run_dir
    work = Path(tempfile.mkdtemp(prefix="shardtrain-prof-"))
    run_dir = work / "run"
    sets = {**CASES[args.case], "train.steps": args.steps, "train.strategy": args.strategy,
            "run.eval_every": 0, "run.checkpoint_every": 0}
    prepare_run_dir(str(CONFIG), sets, run_dir)
    env = {**ENV, "SHARDTRAIN_PROFILE_AT": str(args.at), "SHARDTRAIN_PROFILE_COUNT": str(args.count)}
    st_out, hf_out = work / "shardtrain.prof.json", work / "trainer.prof.json"
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
             str(ROOT / "benchmarks" / "_profiled_worker.py"), "--run-dir", str(run_dir), "--profile-out", str(st_out)],
            work / "shardtrain.log", env)
    acc = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    acc += (["--use_deepspeed", "--zero_stage", "2"] if args.strategy == "zero2" else
            FSDP_ACC if args.strategy.startswith("fsdp") else ["--multi_gpu"])
    acc += [str(ROOT / "benchmarks" / "hf_trainer_side.py"), "--run-dir", str(run_dir), "--out", str(work / "t.json"),
            "--profile-out", str(hf_out)]
    _launch(acc, work / "trainer.log", env)
    st, hf = json.loads(st_out.read_text()), json.loads(hf_out.read_text())
    for name, d in (("shardtrain", st), ("accelerate + Trainer", hf)):
        print(f"{name}: {d['wall_ms_per_step']:.1f} ms per profiled step (wall), "
              f"{sum(v['self_ms'] for v in d['ops'].values()):.1f} ms self CPU; top ops (self CPU per step):")
        print(_table(d["ops"], args.top))
    keys = set(st["ops"]) | set(hf["ops"])
    diff = {k: st["ops"].get(k, {}).get("self_ms", 0.0) - hf["ops"].get(k, {}).get("self_ms", 0.0) for k in keys}
    print("largest differences (shardtrain - Trainer, ms self CPU per step; + = shardtrain slower):")
    for k in sorted(diff, key=lambda k: -abs(diff[k]))[:args.top]:
        print(f"  {diff[k]:+9.2f} ms  {k}  (calls {st['ops'].get(k, {}).get('calls', 0):.1f} vs "
              f"{hf['ops'].get(k, {}).get('calls', 0):.1f})")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "shardtrain": st, "trainer": hf},
                                       indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
