"""Predicted (shardtrain plan) vs measured GPU memory per phase, on one CUDA GPU (issue 8, point 5).

    python benchmarks/gpu_memory.py                       # the grid on GPU 0 (llama-3.2-1b, seq 2048)
    python benchmarks/gpu_memory.py --model llama-3.1-8b --seq-len 4096 --rows lora_ckpt,qlora_ckpt
    python benchmarks/gpu_memory.py --dry-run             # CPU, tiny model, same code path (CI)

Each row compiles a plan for one GPU (world size 1: single device / DDP, FSDP2, DeepSpeed ZeRO-2 and
ZeRO-3; full, LoRA, QLoRA; checkpointing none/full; AdamW and bitsandbytes 8-bit AdamW), writes a run
directory like `shardtrain launch`, and runs the project's own worker (shardtrain.runtime.worker.run)
on it for a few steps. Around the engine's forward (incl. the loss), backward and optimizer step the
CUDA peak counter is reset, so each phase's `torch.cuda.max_memory_allocated` is that phase's own
peak; `torch.cuda.memory_reserved` is read at the end of each phase. Printed per row and phase:
predicted total and predicted total − cuda_context (what tensors can reach) vs max allocated, and the
reserved bytes (allocator caching + fragmentation; the plan's cuda_context is outside both).
Rows run in a fresh subprocess each on a GPU (reserved memory and the CUDA context start clean).

Needs only torch, transformers and peft (bundled model configs, random init, bundled tokenizer and
corpus: no internet). DeepSpeed rows are skipped when deepspeed is not installed, bitsandbytes rows
(QLoRA, 8-bit AdamW) when bitsandbytes is not, each saying so.

--dry-run: CPU, the tiny preset, two steps per row, in this process; no CUDA statistics exist, so the
"measured" column is PyTorch's MemTracker peak of live tensors (run.memory_trace) instead.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHASES = ("forward", "backward", "optimizer")
TINY = str(ROOT / "configs" / "models" / "tiny-llama.json")

# name -> (strategy, method, grad_ckpt, optimizer, needs)
ROWS = {
    "single_full":       ("ddp", "full", "none", "adamw", ()),
    "single_full_ckpt":  ("ddp", "full", "full", "adamw", ()),
    "single_adamw8bit":  ("ddp", "full", "full", "adamw8bit", ("bitsandbytes",)),
    "fsdp2_full":        ("fsdp_full_shard", "full", "none", "adamw", ()),
    "fsdp2_full_ckpt":   ("fsdp_full_shard", "full", "full", "adamw", ()),
    "zero2_full_ckpt":   ("zero2", "full", "full", "adamw", ("deepspeed",)),
    "zero3_full_ckpt":   ("zero3", "full", "full", "adamw", ("deepspeed",)),
    "lora":              ("ddp", "lora", "none", "adamw", ()),
    "lora_ckpt":         ("ddp", "lora", "full", "adamw", ()),
    "qlora_ckpt":        ("ddp", "qlora", "full", "adamw", ("bitsandbytes",)),
}


def missing(needs) -> list[str]:
    return [m for m in needs if importlib.util.find_spec(m) is None]


def row_config(name: str, a) -> dict:
    strategy, method, ckpt, opt, _ = ROWS[name]
    return {"model": {"name": TINY if a.dry_run else a.model},
            "hardware": {"nodes": 1, "gpus_per_node": 1, "gpu_memory": a.gpu_memory},
            "train": {"strategy": strategy, "method": method, "grad_ckpt": ckpt, "optimizer": opt,
                      "precision": ("bf16" if method == "qlora" else "fp32") if a.dry_run else a.precision,
                      "seq_len": a.seq_len,
                      "micro_batch": a.micro_batch, "global_batch": a.micro_batch, "steps": a.steps,
                      "warmup_steps": 0, "lr": 1e-4},
            "run": {"device": "cpu" if a.dry_run else "cuda", "checkpoint_every": 0, "eval_every": 0,
                    "memory_trace": bool(a.dry_run)}}


class PhasePeaks:
    """Wraps the engine's forward / backward / step (as runtime/memtrace.py does): per phase, the
    CUDA peak since the phase began (reset at each boundary) and the reserved bytes at its end."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.steps: list[dict] = []
        self._cur = None

    def _boundary(self, nxt):
        import torch
        if self.cuda and self._cur is not None:
            rec = self.steps[-1].setdefault(self._cur, {"max_allocated": 0, "reserved": 0})
            rec["max_allocated"] = max(rec["max_allocated"], torch.cuda.max_memory_allocated())
            rec["reserved"] = max(rec["reserved"], torch.cuda.memory_reserved())
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._cur = nxt

    def install(self, r) -> None:
        eng = r.engine
        fwd, bwd, step = eng.forward, eng.backward, eng.step

        def forward(batch):
            if self._cur in (None, "optimizer"):
                self.steps.append({})
            self._boundary("forward")
            return fwd(batch)

        def backward(loss, is_last):
            self._boundary("backward")
            return bwd(loss, is_last)

        def opt_step(lr):
            self._boundary("optimizer")
            out = step(lr)
            self._boundary(None)
            return out
        eng.forward, eng.backward, eng.step = forward, backward, opt_step


def run_row(name: str, a, work: Path) -> dict:
    """Plan, write the run dir, train a.steps steps with the worker; predicted and measured per phase."""
    from shardtrain.config import pipeline
    from shardtrain.launcher.rundir import write_run_dir
    cfg, p = pipeline.compile(row_config(name, a))
    pj = p.to_json()
    out = {"row": name, "strategy": pj["strategy"], "method": pj["method"], "grad_ckpt": pj["gradient_checkpointing"],
           "optimizer": pj["optimizer"], "fits": pj["fits"], "peak_phase": pj.get("peak_phase"),
           "predicted": pj.get("per_phase") or {"peak": pj["per_gpu"]}}
    if not pj["fits"] and not a.dry_run:
        out["skipped"] = "the plan says it does not fit: " + "; ".join(pj.get("why_not") or [])
        return out
    d = write_run_dir(work / name, cfg, p, resume=False).run_dir
    import torch
    from shardtrain.runtime.worker import run
    cuda = torch.cuda.is_available() and not a.dry_run
    peaks = PhasePeaks(cuda)
    t0 = time.time()
    run(d, destroy_group=False, on_setup=peaks.install)
    out["wall_s"] = round(time.time() - t0, 1)
    steady = peaks.steps[1:] or peaks.steps  # step 1 creates optimizer states / DDP buckets
    if cuda:
        out["measured"] = {ph: {k: max(s[ph][k] for s in steady if ph in s) for k in ("max_allocated", "reserved")}
                           for ph in PHASES if any(ph in s for s in steady)}
    else:
        tr = json.loads((d / "memory_rank0.json").read_text()).get("memory_trace") or {}
        per = (tr.get("no_comm_temp") or tr).get("per_phase", {})  # as on NCCL (runtime/memtrace.py COLLECTIVES)
        out["measured"] = {ph: {"memtracker_live": v["total"]} for ph, v in per.items()}
    return out


def _isolated(name: str, a, work: Path) -> dict:
    """One row in a fresh process (clean CUDA context and allocator)."""
    res = work / f"{name}.json"
    argv = [sys.executable, __file__, "--_row", name, "--_out", str(res), "--_work", str(work)] + a._passthrough
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=a.row_timeout)
    if proc.returncode != 0 or not res.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"row": name, "error": " | ".join(tail)}
    return json.loads(res.read_text())


def render(rows: list[dict]) -> str:
    from shardtrain.units import fmt_bytes
    lines = [f"{'row':<18}{'phase':<10}{'predicted':>11}{'pred-ctx':>11}{'measured':>11}{'reserved':>11}{'err':>10}"]
    for r in rows:
        if "skipped" in r or "error" in r:
            lines.append(f"{r['row']:<18}{'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}")
            continue
        for ph in PHASES:
            p = r["predicted"].get(ph) or r["predicted"].get("peak")
            m = r.get("measured", {}).get(ph, {})
            meas = m.get("max_allocated", m.get("memtracker_live"))
            pt = p["total"] - p.get("cuda_context", 0)
            err = f"{(pt - meas) / meas * 100:+.1f}%" if meas else ""
            star = "*" if ph == r.get("peak_phase") else " "
            lines.append(f"{r['row']:<18}{ph + star:<10}{fmt_bytes(p['total']):>11}{fmt_bytes(pt):>11}"
                         f"{fmt_bytes(meas) if meas else '-':>11}"
                         f"{fmt_bytes(m['reserved']) if 'reserved' in m else '-':>11}{err:>10}")
    lines.append("* the plan's peak phase; err = (predicted − cuda_context − measured) / measured")
    return "\n".join(lines)


def versions() -> dict:
    import torch
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for m in ("transformers", "peft", "deepspeed", "bitsandbytes"):
        try:
            v[m] = __import__(m).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package
            v[m] = None
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
        v["cuda"] = torch.version.cuda
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, in-process (CI)")
    ap.add_argument("--model", default="llama-3.2-1b", help="preset name or config.json (random init)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (dry run: 64)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default 2 (dry run: 2)")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=None, help="default 4 (dry run: 2)")
    ap.add_argument("--gpu-memory", default=None, help="default: the GPU's total memory (dry run: 80GiB)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--json", dest="json_out", help="also write the results here")
    ap.add_argument("--row-timeout", type=int, default=1800)
    ap.add_argument("--_row", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a._passthrough = [x for x in (argv if argv is not None else sys.argv[1:])]
    a.seq_len = a.seq_len or (64 if a.dry_run else 2048)
    a.micro_batch = a.micro_batch or 2
    a.steps = a.steps or (2 if a.dry_run else 4)
    import torch
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_memory.py: no CUDA GPU here (torch.cuda.is_available() is False); run with --dry-run "
              "to exercise the code path on CPU", file=sys.stderr)
        return 2
    a.gpu_memory = a.gpu_memory or ("80GiB" if a.dry_run else f"{torch.cuda.get_device_properties(0).total_memory}B")
    if a._row:  # child of _isolated
        Path(a._out).write_text(json.dumps(run_row(a._row, a, Path(a._work))))
        return 0
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad:
        print(f"--rows: unknown row(s) {', '.join(bad)}; choose from {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if a.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_memory_") as tmp:
        for name in names:
            lack = missing(ROWS[name][4])
            if lack:
                results.append({"row": name, "skipped": f"{', '.join(lack)} not installed"})
            elif a.dry_run:
                results.append(run_row(name, a, Path(tmp)))
            else:
                results.append(_isolated(name, a, Path(tmp)))
            done = "skipped" if "skipped" in results[-1] else "done"
            print(f"[gpu_memory] {name}: {done}", file=sys.stderr, flush=True)
    v = versions()
    print(f"versions: {json.dumps(v)}")
    print(f"mode: {'dry run (CPU, MemTracker live tensors)' if a.dry_run else 'CUDA'}; model "
          f"{'tiny-llama' if a.dry_run else a.model}, seq {a.seq_len}, micro batch {a.micro_batch}, {a.steps} steps")
    print(render(results))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"versions": v, "args": a._passthrough, "rows": results}, indent=1))
    if a.dry_run:
        from shardtrain.runtime.dist import destroy
        destroy()
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
