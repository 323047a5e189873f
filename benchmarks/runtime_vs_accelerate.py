"""shardtrain's runtime vs `accelerate launch` + the HF Trainer, and its start-up cost vs bare torchrun.

    python benchmarks/runtime_vs_accelerate.py [--steps 40] [--skip 5] [--startup-repeats 3] [--record]

1. Throughput, for DDP and for ZeRO-2 (DeepSpeed): the same job — the tiny Llama of
   configs/examples/tiny-cpu.yaml (random init, same seed), the bundled corpus and tokenizer packed into
   the same seq_len blocks, the same micro batch × accumulation × 2 processes, lr schedule, clipping,
   fp32 — once through `shardtrain launch` and once through `accelerate launch` running
   benchmarks/hf_trainer_side.py (the HF Trainer; ZeRO-2 with the Trainer-style DeepSpeed config from
   the same emitter). Steady-state tokens/s = tokens per optimizer step / the median step wall time over
   the steps after the first --skip (shardtrain: the worker's per-step `step_time_s`; Trainer: time
   between consecutive `on_step_end` callbacks); the median of --rounds alternating runs per side.
   Ratio = shardtrain / Trainer (goal >= 1.0).
2. Start-up: time from the command to the first optimizer step and to exit, `shardtrain launch` (plan
   compile + run-dir preparation + torchrun) vs bare `torchrun -m shardtrain.runtime.worker` on an already
   prepared run dir, same environment; medians of --startup-repeats alternating runs. Ratio goal <= 1.1.

Prints the figures measured in this one run; --record also writes them, with the command and versions,
to benchmarks/results/runtime_vs_accelerate.{md,json}. Asserts nothing. Every subprocess has a timeout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "examples" / "tiny-cpu.yaml"
RESULTS = ROOT / "benchmarks" / "results"
HISTORY = RESULTS / "runtime_vs_accelerate.history.jsonl"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
       "LOCAL_SIZE": "2", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("CUDA_VISIBLE_DEVICES", None)
COMMON_SETS = ["--set", "run.eval_every=0", "--set", "run.checkpoint_every=0"]


def _run(cmd: list[str], timeout: int, log: Path, *, first_step_file: Path | None = None) -> tuple[float, float | None]:
    """Run cmd (output to log); return (wall seconds, seconds until first_step_file got its first line)."""
    t0 = time.perf_counter()
    first = None
    with open(log, "w") as f:
        p = subprocess.Popen(["timeout", "-k", "10", str(timeout), *cmd], stdout=f, stderr=subprocess.STDOUT,
                             env=ENV, cwd=ROOT)
        while p.poll() is None:
            if first is None and first_step_file is not None and first_step_file.is_file() \
                    and first_step_file.stat().st_size > 0:
                first = time.perf_counter() - t0
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"benchmark: {' '.join(cmd[:6])} ... failed with exit code {p.returncode}:\n{tail}")
    return wall, first


def _steady_tps(tokens_per_step: float, step_times: list[float]) -> float:
    """tokens per step / median step time: robust to the other jobs that share the cores."""
    return tokens_per_step / statistics.median(step_times)


def _best_tps(tokens_per_step: float, step_times: list[float]) -> float:
    """tokens per step / 10th-percentile step time: the speed when the cores were free (contention
    only ever makes steps slower)."""
    return tokens_per_step / statistics.quantiles(step_times, n=10)[0]


def _shardtrain_tps(run_dir: Path, skip: int):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in recs if r.get("kind", "train") == "train"]
    steady = train[skip:]
    tok, times = statistics.median(r["tokens"] for r in steady), [r["step_time_s"] for r in steady]
    return _steady_tps(tok, times), _best_tps(tok, times), [r["loss"] for r in train]


def _trainer_tps(out: Path, skip: int):
    d = json.loads(out.read_text())
    times = d["step_times_s"][skip:]
    return _steady_tps(d["tokens_per_step"], times), _best_tps(d["tokens_per_step"], times), d["losses"], d


def _one_shardtrain(strategy: str, steps: int, skip: int, work: Path, i: int) -> dict:
    run_dir = work / f"shardtrain-{strategy}"
    cmd = [str(BIN / "shardtrain"), "launch", str(CONFIG), "--strategy", strategy, "--steps", str(steps),
           "--run-dir", str(run_dir), "--no-resume", *COMMON_SETS]
    wall, _ = _run(cmd, 900, work / f"shardtrain-{strategy}-{i}.log")
    tps, best, losses = _shardtrain_tps(run_dir, skip)
    return {"tokens_per_s": tps, "best_tokens_per_s": best, "wall_s": wall, "losses": losses,
            "launcher": "deepspeed" if (run_dir / "ds_config.json").exists() else "torchrun"}


def _one_trainer(strategy: str, skip: int, work: Path, i: int) -> dict:
    out = work / f"trainer-{strategy}-{i}.json"
    acc = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    acc += ["--use_deepspeed", "--zero_stage", "2"] if strategy == "zero2" else ["--multi_gpu"]
    # the shardtrain run dir of this strategy supplies run.yaml + plan.json (the same job); it is only read
    acc += [str(ROOT / "benchmarks" / "hf_trainer_side.py"), "--run-dir", str(work / f"shardtrain-{strategy}"),
            "--out", str(out)]
    wall, _ = _run(acc, 900, work / f"trainer-{strategy}-{i}.log")
    tps, best, losses, d = _trainer_tps(out, skip)
    return {"tokens_per_s": tps, "best_tokens_per_s": best, "wall_s": wall, "losses": losses,
            "distributed_type": d["distributed"]}


def throughput(strategy: str, steps: int, skip: int, rounds: int, work: Path) -> dict:
    st, hf = [], []
    for i in range(rounds):  # alternate the order so drifting background load hits both sides alike
        if i % 2 == 0:
            st.append(_one_shardtrain(strategy, steps, skip, work, i))
            hf.append(_one_trainer(strategy, skip, work, i))
        else:
            hf.append(_one_trainer(strategy, skip, work, i))
            st.append(_one_shardtrain(strategy, steps, skip, work, i))
    med = statistics.median
    st_tps, hf_tps = med(r["tokens_per_s"] for r in st), med(r["tokens_per_s"] for r in hf)
    st_best, hf_best = max(r["best_tokens_per_s"] for r in st), max(r["best_tokens_per_s"] for r in hf)
    return {"strategy": strategy, "steps": steps, "skipped_steps": skip, "rounds": rounds,
            "shardtrain": {"tokens_per_s": round(st_tps, 1), "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in st],
                           "wall_s": round(med(r["wall_s"] for r in st), 2), "launcher": st[0]["launcher"],
                           "loss_first": round(st[-1]["losses"][0], 4), "loss_last": round(st[-1]["losses"][-1], 4)},
            "trainer": {"tokens_per_s": round(hf_tps, 1), "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in hf],
                        "wall_s": round(med(r["wall_s"] for r in hf), 2), "launcher": "accelerate launch",
                        "distributed_type": hf[0]["distributed_type"], "loss_first": round(hf[-1]["losses"][0], 4),
                        "loss_last": round(hf[-1]["losses"][-1], 4)},
            "ratio": round(st_tps / hf_tps, 3),
            "best": {"shardtrain": round(st_best, 1), "trainer": round(hf_best, 1), "ratio": round(st_best / hf_best, 3)}}


def startup(repeats: int, steps: int, work: Path) -> dict:
    from shardtrain.launcher.rundir import prepare_run_dir
    sets = {"train.steps": steps, "run.eval_every": 0, "run.checkpoint_every": 0}
    st_first, st_wall, bare_first, bare_wall = [], [], [], []
    for i in range(repeats):
        bare = work / f"bare-{i}"
        prepare_run_dir(str(CONFIG), sets, bare)  # prepared outside the timed region
        bcmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
                "-m", "shardtrain.runtime.worker", "--run-dir", str(bare)]
        st = work / f"st-{i}"
        scmd = [str(BIN / "shardtrain"), "launch", str(CONFIG), "--run-dir", str(st), "--steps", str(steps),
                *COMMON_SETS]
        order = [("bare", bcmd, bare), ("shardtrain", scmd, st)]
        if i % 2:
            order.reverse()
        for name, cmd, rd in order:
            wall, first = _run(cmd, 600, work / f"startup-{name}-{i}.log", first_step_file=rd / "metrics.jsonl")
            (bare_first if name == "bare" else st_first).append(first)
            (bare_wall if name == "bare" else st_wall).append(wall)
    med = statistics.median
    return {"repeats": repeats, "steps": steps,
            "bare_torchrun": {"first_step_s": round(med(bare_first), 2), "wall_s": round(med(bare_wall), 2),
                              "all_first_step_s": [round(x, 2) for x in bare_first]},
            "shardtrain_launch": {"first_step_s": round(med(st_first), 2), "wall_s": round(med(st_wall), 2),
                                  "all_first_step_s": [round(x, 2) for x in st_first]},
            "first_step_ratio": round(med(st_first) / med(bare_first), 3),
            "wall_ratio": round(med(st_wall) / med(bare_wall), 3)}


def versions() -> dict:
    import accelerate
    import deepspeed
    import torch
    import transformers
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "os": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per throughput run")
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of tokens/s (warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating shardtrain/Trainer runs per strategy (median)")
    ap.add_argument("--startup-repeats", type=int, default=3)
    ap.add_argument("--startup-steps", type=int, default=3)
    ap.add_argument("--strategies", default="ddp,zero2")
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/runtime_vs_accelerate.{md,json}")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (run dirs, logs)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="shardtrain-bench-"))
    t0 = time.time()
    load_before = os.getloadavg()
    rows = []
    for s in args.strategies.split(","):
        r = throughput(s, args.steps, args.skip, args.rounds, work)
        rows.append(r)
        print(f"{s:<6} tokens/s  shardtrain {r['shardtrain']['tokens_per_s']:>9.1f} ({r['shardtrain']['launcher']})"
              f"   accelerate+Trainer {r['trainer']['tokens_per_s']:>9.1f}   ratio {r['ratio']:.3f} (goal >= 1.0)"
              f"   loss {r['shardtrain']['loss_first']:.3f}→{r['shardtrain']['loss_last']:.3f} vs "
              f"{r['trainer']['loss_first']:.3f}→{r['trainer']['loss_last']:.3f}; best-case (p10 step time) "
              f"{r['best']['shardtrain']:.0f} vs {r['best']['trainer']:.0f}: ratio {r['best']['ratio']:.3f}", flush=True)
    su = startup(args.startup_repeats, args.startup_steps, work)
    print(f"start-up to first step: shardtrain launch {su['shardtrain_launch']['first_step_s']:.2f} s vs bare torchrun "
          f"{su['bare_torchrun']['first_step_s']:.2f} s: ratio {su['first_step_ratio']:.3f} (goal <= 1.1); "
          f"whole run {su['shardtrain_launch']['wall_s']:.2f} vs {su['bare_torchrun']['wall_s']:.2f} s: ratio "
          f"{su['wall_ratio']:.3f}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "versions": versions(), "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "duration_s": round(time.time() - t0, 1),
              "throughput": rows, "startup": su}
    if args.record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "runtime_vs_accelerate.json").write_text(json.dumps(result, indent=2) + "\n")
        with open(HISTORY, "a") as f:  # every recorded run, so the spread between runs stays visible
            f.write(json.dumps(_history_row(result)) + "\n")
        (RESULTS / "runtime_vs_accelerate.md").write_text(_markdown(result, _history()))
        print(f"recorded in {RESULTS / 'runtime_vs_accelerate.md'}")
    if args.keep:
        print(f"work directory: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def _history_row(r: dict) -> dict:
    return {"date": r["date"], "load_average_before": r["load_average_before"],
            "ratios": {t["strategy"]: t["ratio"] for t in r["throughput"]},
            "best_case_ratios": {t["strategy"]: t["best"]["ratio"] for t in r["throughput"]},
            "startup_first_step_ratio": r["startup"]["first_step_ratio"], "note": ""}


def _history() -> list[dict]:
    if not HISTORY.is_file():
        return []
    return [json.loads(x) for x in HISTORY.read_text().splitlines() if x.strip()]


def _markdown(r: dict, history: list[dict] | None = None) -> str:
    v = r["versions"]
    lines = ["# shardtrain runtime vs accelerate launch + HF Trainer", "",
             f"Measured {r['date']} with `python benchmarks/{r['command']}` ({r['duration_s']} s).", "",
             f"Machine: {v['cores']} cores ({v['cpu']}), no GPU; {v['os']}. Load average before/after: "
             f"{r['load_average_before']} / {r['load_average_after']} (other jobs shared the cores: figures are "
             "noisy, ratios were measured back to back).", "",
             f"Versions: python {v['python']}, torch {v['torch']}, deepspeed {v['deepspeed']}, transformers "
             f"{v['transformers']}, accelerate {v['accelerate']}.", "",
             "Job: configs/examples/tiny-cpu.yaml (tiny Llama, random init; bundled corpus; seq 128, global batch 16 "
             "= micro 8 × 2 processes; fp32; AdamW), gloo on CPU.", "",
             "## Steady-state tokens/s (goal: ratio >= 1.0)", "",
             "Tokens/s = tokens per optimizer step / median step time after the skipped warm-up steps; median of "
             "the alternating rounds (all rounds in the JSON).", "",
             "| strategy | steps (skipped) | shardtrain | accelerate + Trainer | ratio | best-case ratio (p10 step) | "
             "loss shardtrain | loss Trainer |",
             "|---|---|---|---|---|---|---|---|"]
    for t in r["throughput"]:
        s, h = t["shardtrain"], t["trainer"]
        lines.append(f"| {t['strategy']} | {t['steps']} ({t['skipped_steps']}) | {s['tokens_per_s']} ({s['launcher']}) | "
                     f"{h['tokens_per_s']} ({h['distributed_type']}) | **{t['ratio']}** | {t['best']['ratio']} "
                     f"({t['best']['shardtrain']} vs {t['best']['trainer']}) | {s['loss_first']} → "
                     f"{s['loss_last']} | {h['loss_first']} → {h['loss_last']} |")
    su = r["startup"]
    lines += ["", "## Start-up vs bare torchrun (goal: ratio <= 1.1)", "",
              f"Median of {su['repeats']} alternating runs of {su['steps']} steps each.", "",
              "| | to first step (s) | whole run (s) |", "|---|---|---|",
              f"| bare `torchrun -m shardtrain.runtime.worker` (run dir prepared beforehand) | "
              f"{su['bare_torchrun']['first_step_s']} | {su['bare_torchrun']['wall_s']} |",
              f"| `shardtrain launch` (compile + prepare + torchrun) | {su['shardtrain_launch']['first_step_s']} | "
              f"{su['shardtrain_launch']['wall_s']} |",
              f"| ratio | **{su['first_step_ratio']}** | **{su['wall_ratio']}** |", "",
              "Raw figures: runtime_vs_accelerate.json (same directory)."]
    if history:
        lines += ["", "## All recorded runs (runtime_vs_accelerate.history.jsonl)", "",
                  "The cores are shared with other jobs; the spread between runs is the honest error bar.", "",
                  "| date | load before | tokens/s ratio (median) | best-case ratio | start-up ratio | note |",
                  "|---|---|---|---|---|---|"]
        for h in history:
            fmt = lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) or "—"  # noqa: E731
            lines.append(f"| {h['date']} | {h['load_average_before']} | {fmt(h['ratios'])} | "
                         f"{fmt(h.get('best_case_ratios') or {})} | {h.get('startup_first_step_ratio', '—')} | "
                         f"{h.get('note', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
