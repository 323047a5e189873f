"""shardtrain's runtime vs `accelerate launch` + the HF Trainer, and its start-up cost vs bare torchrun.

    python benchmarks/runtime_vs_accelerate.py [--steps 40] [--skip 5] [--startup-repeats 3] [--record]

1. Throughput, for DDP and for ZeRO-2 (DeepSpeed): the same job — the tiny Llama of
   configs/examples/tiny-cpu.yaml (random init, same seed), the bundled corpus and tokenizer packed into
   the same seq_len blocks, the same micro batch × accumulation × 2 processes, lr schedule, clipping,
   fp32 — once through `shardtrain launch` and once through `accelerate launch` running
   benchmarks/hf_trainer_side.py (the HF Trainer; ZeRO-2 with the Trainer-style DeepSpeed config from
   the same emitter). Step time, the same clock on both sides: wall time from one optimizer step's end
   to the next (shardtrain: the metrics records' `unix_time_s`; Trainer: consecutive `on_step_end`
   callbacks). The steps after the first --skip of all --rounds alternating runs are pooled per side:
   steady-state tokens/s = tokens per optimizer step / the pooled median step time, best case = / the
   pooled 10th percentile. Ratio = shardtrain / Trainer (goal >= 1.0); per-round ratios show the spread.
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
# The jobs (issue 11): "tiny" (configs/examples/tiny-cpu.yaml, 0.43M params, seq 128: the loop's own
# per-step work dominates) and "compute" (benchmarks/models/bench-llama-26m.json, 26.2M params, seq 512,
# global batch 4: the model's matmuls dominate, the loop's overhead is small). Both sides train the
# same plan (micro batch, accumulation, no checkpointing, full-logits loss).
CASES = {"tiny": [],
         "compute": ["--model", str(ROOT / "benchmarks" / "models" / "bench-llama-26m.json"), "--seq-len", "512",
                     "--global-batch", "4", "--grad-ckpt", "none", "--loss", "full"]}
# accelerate's FSDP2 flags for the Trainer side of fsdp_full_shard (per-layer wrap, as shardtrain's FSDP2)
FSDP_ACC = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
            "LlamaDecoderLayer", "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_cpu_ram_efficient_loading",
            "false"]


LOADS: list[list[float]] = []  # the 1-minute load average before each run (noise on shared cores)


def _run(cmd: list[str], timeout: int, log: Path, *, first_step_file: Path | None = None) -> tuple[float, float | None]:
    """Run cmd (output to log); return (wall seconds, seconds until first_step_file got its first line)."""
    LOADS.append([round(x, 2) for x in os.getloadavg()])
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
    """Step periods from the records' unix_time_s (taken after each step's last collective): the
    wall time from one optimizer step's end to the next, between-step work included — the clock the
    Trainer side uses (consecutive on_step_end callbacks). Steps skip+1.. on both sides."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in recs if r.get("kind", "train") == "train"]
    steady = train[skip:]
    tok = statistics.median(r["tokens"] for r in steady)
    times = [b["unix_time_s"] - a["unix_time_s"] for a, b in zip(train, train[1:])][max(skip - 1, 0):]
    return _steady_tps(tok, times), _best_tps(tok, times), [r["loss"] for r in train], tok, times


def _trainer_tps(out: Path, skip: int):
    d = json.loads(out.read_text())
    times = d["step_times_s"][skip:]
    return (_steady_tps(d["tokens_per_step"], times), _best_tps(d["tokens_per_step"], times), d["losses"], d,
            d["tokens_per_step"], times)


def _one_shardtrain(strategy: str, steps: int, skip: int, work: Path, i: int, case: str = "tiny") -> dict:
    run_dir = work / f"shardtrain-{case}-{strategy}"
    cmd = [str(BIN / "shardtrain"), "launch", str(CONFIG), "--strategy", strategy, "--steps", str(steps),
           "--run-dir", str(run_dir), "--no-resume", *CASES[case], *COMMON_SETS]
    wall, _ = _run(cmd, 900, work / f"shardtrain-{case}-{strategy}-{i}.log")
    tps, best, losses, tok, times = _shardtrain_tps(run_dir, skip)
    return {"tokens_per_s": tps, "best_tokens_per_s": best, "wall_s": wall, "losses": losses, "load_1m": LOADS[-1][0],
            "launcher": "deepspeed" if (run_dir / "ds_config.json").exists() else "torchrun",
            "tokens_per_step": tok, "step_times_s": times}


def _one_trainer(strategy: str, skip: int, work: Path, i: int, case: str = "tiny") -> dict:
    out = work / f"trainer-{case}-{strategy}-{i}.json"
    acc = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    acc += (["--use_deepspeed", "--zero_stage", "2"] if strategy == "zero2" else
            FSDP_ACC if strategy.startswith("fsdp") else ["--multi_gpu"])
    # the shardtrain run dir of this strategy supplies run.yaml + plan.json (the same job); it is only read
    acc += [str(ROOT / "benchmarks" / "hf_trainer_side.py"), "--run-dir", str(work / f"shardtrain-{case}-{strategy}"),
            "--out", str(out)]
    note, log, t0 = "", work / f"trainer-{case}-{strategy}-{i}.log", time.perf_counter()
    try:
        wall, _ = _run(acc, 900, log)
    except SystemExit:
        # the DeepSpeed Trainer side sometimes aborts at interpreter exit ("terminate called without an
        # active exception") AFTER training and writing its results: keep the measured steps, say so
        if not (out.is_file() and "terminate called without an active exception" in log.read_text(errors="replace")):
            raise
        wall, note = time.perf_counter() - t0, "Trainer process aborted at exit after writing its results"
        print(f"{case}/{strategy} round {i}: {note}", flush=True)
    tps, best, losses, d, tok, times = _trainer_tps(out, skip)
    return {"tokens_per_s": tps, "best_tokens_per_s": best, "wall_s": wall, "losses": losses, "load_1m": LOADS[-1][0],
            "distributed_type": d["distributed"], "note": note, "tokens_per_step": tok, "step_times_s": times}


def throughput(strategy: str, steps: int, skip: int, rounds: int, work: Path, case: str = "tiny") -> dict:
    st, hf = [], []
    for i in range(rounds):  # alternate the order so drifting background load hits both sides alike
        if i % 2 == 0:
            st.append(_one_shardtrain(strategy, steps, skip, work, i, case))
            hf.append(_one_trainer(strategy, skip, work, i, case))
        else:
            hf.append(_one_trainer(strategy, skip, work, i, case))
            st.append(_one_shardtrain(strategy, steps, skip, work, i, case))
    med = statistics.median
    # every steady step of every round, pooled per side: the median and p10 of 4 x 50 steps are far
    # steadier than a median of 2 per-round medians on shared cores (the per-round figures stay listed)
    st_all = [t for r in st for t in r["step_times_s"]]
    hf_all = [t for r in hf for t in r["step_times_s"]]
    st_tok, hf_tok = st[0]["tokens_per_step"], hf[0]["tokens_per_step"]
    st_tps, hf_tps = _steady_tps(st_tok, st_all), _steady_tps(hf_tok, hf_all)
    st_best, hf_best = _best_tps(st_tok, st_all), _best_tps(hf_tok, hf_all)
    paired = [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(st, hf)]
    return {"case": case, "strategy": strategy, "steps": steps, "skipped_steps": skip, "rounds": rounds,
            "load_1m_per_run": {"shardtrain": [r["load_1m"] for r in st], "trainer": [r["load_1m"] for r in hf]},
            "shardtrain": {"tokens_per_s": round(st_tps, 1), "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in st],
                           "wall_s": round(med(r["wall_s"] for r in st), 2), "launcher": st[0]["launcher"],
                           "loss_first": round(st[-1]["losses"][0], 4), "loss_last": round(st[-1]["losses"][-1], 4)},
            "trainer": {"tokens_per_s": round(hf_tps, 1), "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in hf],
                        "wall_s": round(med(r["wall_s"] for r in hf), 2), "launcher": "accelerate launch",
                        "distributed_type": hf[0]["distributed_type"], "notes": [r["note"] for r in hf if r["note"]],
                        "loss_first": round(hf[-1]["losses"][0], 4),
                        "loss_last": round(hf[-1]["losses"][-1], 4)},
            "ratio": round(st_tps / hf_tps, 3), "per_round_ratios": paired,
            "steps_pooled": {"shardtrain": len(st_all), "trainer": len(hf_all)},
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
    ap.add_argument("--compute-strategies", default="ddp,fsdp_full_shard,zero2",
                    help="strategies of the compute-bound case (26M params, seq 512); '' skips it")
    ap.add_argument("--compute-steps", type=int, default=12)
    ap.add_argument("--compute-skip", type=int, default=3)
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up comparison")
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/runtime_vs_accelerate.{md,json}")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (run dirs, logs)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="shardtrain-bench-"))
    t0 = time.time()
    load_before = os.getloadavg()
    rows = []
    jobs = [("tiny", s, args.steps, args.skip) for s in args.strategies.split(",") if s]
    jobs += [("compute", s, args.compute_steps, args.compute_skip) for s in args.compute_strategies.split(",") if s]
    for case, s, steps, skip in jobs:
        try:
            r = throughput(s, steps, skip, args.rounds, work, case)
        except SystemExit as e:  # one side failed: record it, keep measuring the others
            print(f"{case}/{s}: FAILED: {str(e)[:2000]}", flush=True)
            rows.append({"case": case, "strategy": s, "error": str(e)[-1500:]})
            continue
        rows.append(r)
        print(f"{case:<7} {s:<6} tokens/s  shardtrain {r['shardtrain']['tokens_per_s']:>9.1f} ({r['shardtrain']['launcher']})"
              f"   accelerate+Trainer {r['trainer']['tokens_per_s']:>9.1f}   ratio {r['ratio']:.3f} (goal >= 1.0)"
              f"   loss {r['shardtrain']['loss_first']:.3f}→{r['shardtrain']['loss_last']:.3f} vs "
              f"{r['trainer']['loss_first']:.3f}→{r['trainer']['loss_last']:.3f}; best-case (p10 step time) "
              f"{r['best']['shardtrain']:.0f} vs {r['best']['trainer']:.0f}: ratio {r['best']['ratio']:.3f}", flush=True)
    su = startup(args.startup_repeats, args.startup_steps, work) if not args.no_startup else None
    if su:
        print(f"start-up to first step: shardtrain launch {su['shardtrain_launch']['first_step_s']:.2f} s vs bare torchrun "
          f"{su['bare_torchrun']['first_step_s']:.2f} s: ratio {su['first_step_ratio']:.3f} (goal <= 1.1); "
          f"whole run {su['shardtrain_launch']['wall_s']:.2f} vs {su['bare_torchrun']['wall_s']:.2f} s: ratio "
          f"{su['wall_ratio']:.3f}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "versions": versions(), "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "duration_s": round(time.time() - t0, 1),
              "throughput": rows, "startup": su, "load_1m_before_each_run": LOADS}
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
            "ratios": {_key(t): t["ratio"] for t in r["throughput"] if "ratio" in t},
            "best_case_ratios": {_key(t): t["best"]["ratio"] for t in r["throughput"] if "best" in t},
            "startup_first_step_ratio": (r["startup"] or {}).get("first_step_ratio"), "note": ""}


def _key(t: dict) -> str:
    return t["strategy"] if t.get("case", "tiny") == "tiny" else f"{t['case']}/{t['strategy']}"


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
             "Jobs (2 processes, gloo on CPU, fp32, AdamW, bundled corpus, random init): **tiny** = "
             "configs/examples/tiny-cpu.yaml (tiny Llama 0.43M params; seq 128, global batch 16: the loop's own "
             "per-step work dominates); **compute** = benchmarks/models/bench-llama-26m.json (26.2M params; seq 512, "
             "global batch 4; no checkpointing: the model's matmuls dominate). The 1-minute load average before "
             "each run is listed per row (shardtrain runs; Trainer runs).", "",
             "## Steady-state tokens/s (goal: ratio >= 1.0)", "",
             "Step time on both sides = wall time from one optimizer step's end to the next (shardtrain: the "
             "metrics records' unix_time_s; Trainer: consecutive on_step_end callbacks), the steps after the "
             "skipped warm-up of every alternating round pooled per side. Tokens/s = tokens per optimizer step / "
             "median pooled step time; best case = / 10th-percentile step time (contention only ever slows a step "
             "down). Per-round ratios (round medians, shardtrain/Trainer) show the spread.", "",
             "| case | strategy | steps (skipped) x rounds | shardtrain | accelerate + Trainer | ratio | best-case "
             "ratio (p10 step) | per-round ratios | loss shardtrain | loss Trainer | load (1 min) before each run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in r["throughput"]:
        if "error" in t:
            lines.append(f"| {t.get('case', 'tiny')} | {t['strategy']} | failed: {t['error'][-200:]!r} "
                         "| | | | | | | |".replace("\n", " "))
            continue
        s, h = t["shardtrain"], t["trainer"]
        loads = t.get("load_1m_per_run", {})
        lines.append(f"| {t.get('case', 'tiny')} | {t['strategy']} | {t['steps']} ({t['skipped_steps']}) x "
                     f"{t['rounds']} | {s['tokens_per_s']} ({s['launcher']}) | "
                     f"{h['tokens_per_s']} ({h['distributed_type']}) | **{t['ratio']}** | **{t['best']['ratio']}** "
                     f"({t['best']['shardtrain']} vs {t['best']['trainer']}) | "
                     f"{', '.join(map(str, t.get('per_round_ratios', [])))} | {s['loss_first']} → "
                     f"{s['loss_last']} | {h['loss_first']} → {h['loss_last']} | "
                     f"{loads.get('shardtrain', '')}; {loads.get('trainer', '')} |")
    if any(t.get("strategy", "").startswith("fsdp") and "MULTI_CPU" in t.get("trainer", {}).get("distributed_type", "")
           for t in r["throughput"]):
        lines += ["", "FSDP rows: on CPU `accelerate launch --use_fsdp` falls back to DistributedType.MULTI_CPU (plain "
                  "DDP; accelerate's FSDP needs an accelerator), so the Trainer side there is DDP, not FSDP2: the "
                  "ratio compares shardtrain's FSDP2 (all-gather + reduce-scatter per layer over gloo) with DDP."]
    su = r["startup"]
    if not su:
        lines += ["", "Start-up comparison not run (--no-startup)."]
    else:
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
