"""The per-rank worker: `python -m shardtrain.runtime.worker --run-dir DIR` (under torchrun or the
deepspeed launcher, which appends `--local_rank=N`; ignored — LOCAL_RANK comes from the environment).

Run directory contract (written by `shardtrain launch`):
  in:  run.yaml (resolved RunConfig: the keys runtime/settings.py reads), plan.json (Plan JSON incl.
       "spec" and the "runtime" facts: model and data sources, engine configs, predictions; compiler/facts.py);
       ds_config.json / fsdp.json are exports of the same engine configs (an edited one is refused)
  out: metrics.jsonl (rank 0: one record per optimizer step, "kind": "train" | "eval"),
       memory_rank{R}.json, checkpoints/step_N/, final/, logs/worker_rank{R}.log, logs/memory_table.txt
Exit 0 when done; 75 (exitcodes.EXIT_PREEMPTED) when stopped by SIGTERM/SIGINT/SIGUSR1/SIGUSR2 after
saving a checkpoint at the agreed step (a "preempted at step N" line; Slurm requeues while below the
limit; rerun to resume); 65 (EXIT_NONFINITE) after train.max_nonfinite_steps steps in a row with a
non-finite loss or gradient norm (each skipped; runtime/guard.py); under `launch --max-restarts` these two
exit 0 and leave their code in a marker file (exitcodes.STOP_MARKER_ENV); 128+N on a second signal N
(stops at once); 1 on errors.
Device mesh (plan.parallel, issue 18; runtime/mesh.py): the sampler gives each dp rank its samples (tp
and cp peers the same ones; cp ranks feed their token slice, mesh.cp_view), the loss is scaled by
dp × cp (the ranks gradients are averaged over), and the loss sum and token counts take each sequence once.
Resume: with run.resume=auto the latest complete checkpoints/step_N is loaded; the step counter, the
data position (a pure function of the step) and the RNG continue, and metrics.jsonl is cut back to
step N so every step appears once. Environment: SHARDTRAIN_DEVICE (overrides run.device); the
tests' SHARDTRAIN_TEST_* hooks are all in runtime/faults.py.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before importing torch: a pre-emption signal during start-up is kept (issue 13)
    from shardtrain.runtime.preempt import shared_handler
    shared_handler()

import torch

from shardtrain import rundir_format as rf
from shardtrain.exitcodes import DEVICE_ENV, EXIT_NONFINITE, EXIT_PREEMPTED, PROGRESS_ENV
from shardtrain.runtime import checkpoint as ckpt
from shardtrain.runtime.dist import all_reduce_sum, barrier, init_distributed, reduce_sum
from shardtrain.runtime.export import save_final
from shardtrain.runtime import opbuild
from shardtrain.runtime.build import Run, setup
from shardtrain.runtime.data import count_label_tokens, eval_indices
from shardtrain.runtime.faults import maybe_damage, maybe_kill, maybe_oom, poison_loss, test_signal
from shardtrain.runtime.guard import NonFiniteSteps, finite_guard
from shardtrain.runtime.process import early_run_keys, leave_stop_code, setup_logging, stop_marker
from shardtrain.runtime.loss import token_loss
from shardtrain.runtime.mesh import SliceCP
from shardtrain.runtime.optim import lr_at
from shardtrain.runtime.telemetry import LeakDetector, MetricsWriter, PhaseMemory, progress_bar
from shardtrain.runtime.trackers import with_trackers
from shardtrain.runtime.state_bytes import StateMeter, live_bytes

log = logging.getLogger("shardtrain.worker")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(r: Run, step: int, phase: PhaseMemory | None = None, meter: StateMeter | None = None) -> dict:
    """One optimizer step (K micro-steps) of this rank; returns the step's metrics."""
    eng, ds = r.engine, r.train_data
    t0 = time.perf_counter()
    if phase:
        phase.begin_step()
    batches = [ds.collate(ix) for ix in r.sampler.step_indices(step)]
    if "tokens" in r.extra:  # global counts from the sampler: no collective before backward (runtime/stepstats.py)
        n_label, n_input = r.extra["tokens"].step(step)
    else:
        n_input = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                      for b in batches)
        # one rank per sequence counts it (tp and cp peers hold the same samples, runtime/mesh.py)
        w = 1.0 if _coords(r).counts_tokens else 0.0
        n_label, n_input = all_reduce_sum([w * sum(count_label_tokens(b) for b in batches), w * n_input],
                                          r.info.device)
    # the engines average gradients over dp × cp (plan.parallel.grad_reduce = world on a 1-D mesh)
    scale = r.plan.parallel.grad_reduce * eng.loss_multiplier / max(n_label, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=r.info.device)  # no host sync per micro-step
    loss_counts = _coords(r).counts_loss  # tp peers compute the same loss: one of them adds it
    K = len(batches)
    split = _split(r)
    for k, b in enumerate(batches):
        last = k == K - 1
        b = _to(b, r.info.device)
        b, labels, shifted = split.view(b, b.pop("labels"))
        with eng.micro_step(last), split.shard(b, labels):
            loss = token_loss(r)(b, labels, shifted)  # full or chunked logits, activation offload (runtime/loss.py)
            loss = poison_loss(loss, r.info.rank, step + 1)  # TEST-ONLY (runtime/faults.py): a NaN loss
            if phase and last:
                phase.snap("after_forward")
            eng.backward(loss * scale, last)
        loss_sum += loss.detach() if loss_counts else loss.detach() * 0.0  # NaN stays NaN for the guard
        if meter:
            meter.after_micro_backward()
        if phase and last:
            phase.snap("after_backward")
    lr = lr_at(step, lr=r.cfg.train.lr, warmup=r.cfg.train.warmup_steps, total=r.cfg.train.steps,
               min_ratio=r.cfg.train.min_lr_ratio)
    summed: list = []
    eng.guard = finite_guard(loss_sum, summed)  # the non-finite guard, inside eng.step (runtime/guard.py)
    grad_norm = eng.step(lr)
    eng.guard = None  # it holds this step's tensors; a later step gets its own
    if meter:
        meter.after_step()
    if phase:
        phase.snap("after_step")
    (total_loss,) = summed or reduce_sum(loss_sum.reshape(1))  # the step's one collective (and one host sync)
    dt = time.perf_counter() - t0
    rec = {rf.KIND: rf.TRAIN, rf.STEP: step + 1, rf.LOSS: total_loss / max(n_label, 1.0), "lr": lr,
           "grad_norm": grad_norm, rf.STEP_SKIPPED: not eng.step_applied,
           "tokens": int(n_input), "tokens_per_s": n_input / dt, "step_time_s": dt,
           "epoch": round(r.sampler.epoch_of(step + 1), 4), rf.UNIX_TIME: time.time(),
           "memory": dict(phase.phases) if phase else {}}
    if "throughput" in r.extra:
        rec.update(r.extra["throughput"].metrics(n_input, dt))
    return rec


@torch.no_grad()
def evaluate(r: Run, step: int) -> dict | None:
    if r.eval_data is None:
        return None
    eng = r.engine
    m = r.plan.chosen.micro_batch_size
    mc = _coords(r)
    idx = eval_indices(len(r.eval_data), r.cfg.run.eval_batches, m, r.plan.parallel.dp, mc.dp_rank)
    eng.train(False)
    tot = n = 0.0
    split = _split(r)
    try:
        for ix in idx:
            b = _to(r.eval_data.collate(ix), r.info.device)
            b, labels, shifted = split.view(b, b.pop("labels"))
            with split.shard(b, labels):  # ring: labels are this rank's shard after the context (not restored)
                tot += float(token_loss(r)(b, labels, shifted))
            n += float((labels != -100).sum() if shifted else (labels[:, 1:] != -100).sum())
    finally:
        eng.train(True)
    # tp peers score the same tokens (one adds them); cp peers score disjoint slices (each adds its own)
    tot, n = all_reduce_sum([tot if mc.counts_loss else 0.0, n if mc.counts_loss else 0.0], r.info.device)
    loss = tot / max(n, 1.0)
    return {rf.KIND: rf.EVAL, rf.STEP: step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(n)}


def _split(r: Run):
    """How this rank cuts each micro-batch's sequences: ring_attention.RingCP (cp_mode ring: the full
    shifted sequences, sharded by torch's context_parallel around the micro-step) or mesh.SliceCP
    (Ulysses cp: this rank's token slice; cp 1: unchanged)."""
    return r.extra.get("ring") or SliceCP(r.plan.parallel, _coords(r))


def _coords(r: Run):
    """This rank's mesh coordinates (Run.coords; a Run built by hand in a test: the 1-D mesh)."""
    if r.coords is None:
        from shardtrain.runtime.mesh import coords
        r.coords = coords(r.plan.parallel, r.info.rank, r.info.world_size)
    return r.coords


def trainer_state(r: Run, step: int) -> dict:
    return {"step": step, "samples_seen": r.sampler.offset + step * r.sampler.global_batch, "global_batch": r.sampler.global_batch,
            "world_size": r.info.world_size, "strategy": r.plan.strategy.value, "seed": r.cfg.train.seed,
            rf.NONFINITE_STEPS: r.extra["nonfinite"].total if "nonfinite" in r.extra else 0}


def run(run_dir: str | Path, *, destroy_group: bool = True, on_setup=None) -> dict:
    """Train per the run directory; returns a summary. Tests drive several runs per launch
    (`destroy_group=False`) and probe the engine with `on_setup(run)` before the first step."""
    run_dir = Path(run_dir)
    opbuild.install()  # one line before a C++ op is JIT-compiled (DeepSpeed's take ~50 s), from the compiling rank
    from shardtrain.runtime.preempt import release_shared, shared_handler
    pre = shared_handler()  # installed before the process group, model and data (they are slow)
    device_pref, bind_cores = early_run_keys(run_dir)
    info = init_distributed(os.environ.get(DEVICE_ENV) or device_pref, bind_cores=bind_cores)
    setup_logging(run_dir, info.rank)
    if info.device.type == "cpu" and hasattr(os, "sched_getaffinity"):
        log.info("CPU cores of this rank: %s (run.bind_cpu_cores: %s)", sorted(os.sched_getaffinity(0)), bind_cores)
    r = setup(run_dir, info)
    cfg, eng = r.cfg, r.engine
    main = info.is_main
    metrics = MetricsWriter(run_dir / rf.METRICS_JSONL, main)
    start = nonfinite_before = 0
    latest = ckpt.latest_checkpoint(run_dir) if cfg.run.resume == "auto" else None
    if latest:
        state = ckpt.load_checkpoint(eng, latest[1])
        start = int(state["step"])
        nonfinite_before = int(state.get(rf.NONFINITE_STEPS, 0))
        log.info("resumed from %s at step %d", latest[1], start)
        r.sampler.resume_at(start, int(state.get("samples_seen", start * r.sampler.global_batch)))
    metrics.truncate_after(start)
    metrics = with_trackers(metrics, r)  # run.report_to: tensorboard / wandb / mlflow (runtime/trackers.py)
    if on_setup is not None:
        on_setup(r)
    shared_handler(cfg.run.max_requeues)
    signal_at = test_signal()  # TEST-ONLY (runtime/faults.py): a simulated Slurm warning
    meter = StateMeter(eng)
    if cfg.run.memory_trace:  # MemTracker peak per phase on the measured step (runtime/memtrace.py)
        from shardtrain.runtime.memtrace import StepMemTrace
        r.extra["memtrace"] = StepMemTrace(eng)
    measure_at = start + 1 if cfg.train.steps - start > 1 else start  # 2nd step: DDP buckets rebuilt, states exist
    phase = PhaseMemory(info.device, lambda: live_bytes(eng))
    leak = LeakDetector()
    _throughput_setup(r)  # global token counts without a collective; tokens/s, TFLOP/s, MFU (runtime/stepstats.py)
    # The launcher redirects rank stderr to a log file and copies rank 0's to the console, so it
    # asks for the bar explicitly (SHARDTRAIN_PROGRESS=1) instead of relying on isatty().
    want_bar = sys.stderr.isatty() or os.environ.get(PROGRESS_ENV) == "1"
    bar = progress_bar(main and want_bar, cfg.train.steps, start)
    total = cfg.train.steps
    losses, evals, saved_at, preempted, stopped = [], [], -1, False, None
    nonfinite = r.extra["nonfinite"] = NonFiniteSteps(cfg.train.max_nonfinite_steps, nonfinite_before)

    def save(step: int) -> None:
        ckpt.save_checkpoint(eng, run_dir, step, trainer_state(r, step), cfg.run.keep_checkpoints)
        maybe_damage(run_dir, step, info.rank)  # TEST-ONLY (runtime/faults.py): same-size damage
    eng.train(True)
    for s in range(start, total):
        maybe_oom(s + 1, r.plan.chosen.micro_batch_size)  # records where; TEST-ONLY limit (runtime/faults.py)
        meter.active = phase.measure = s == measure_at
        with (r.extra["memtrace"].step() if meter.active and "memtrace" in r.extra else contextlib.nullcontext()):
            rec = train_step(r, s, phase, meter if meter.active else None)
        meter.active = False
        step = s + 1
        losses.append(rec["loss"])
        stop = nonfinite.update(rec)
        if rec[rf.STEP_SKIPPED] and main:
            log.warning(nonfinite.warning(rec))
        if step % cfg.run.log_every == 0 or step == total or rec[rf.STEP_SKIPPED]:
            metrics.write(rec)
        if stop:
            metrics.flush()
            stopped = nonfinite.stop_message(step, saved_at if saved_at > 0 else (start or None))
            if main:
                print(stopped, flush=True)
            break
        if msg := leak.update(step, phase.steady_value()):
            log.warning(msg)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", **_speed_postfix(rec))
        elif main and (step % max(1, total // 20) == 0 or step == total):
            log.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f %.0f tok/s%s", step, total, rec["loss"],
                     rec["lr"], rec["grad_norm"], rec["tokens_per_s"], _speed_text(rec))
        if cfg.run.eval_every and (step % cfg.run.eval_every == 0 or step == total):
            ev = evaluate(r, step)
            if ev:
                evals.append(ev)
                metrics.write(ev)
                if main:
                    log.info("eval step %d: loss %.4f ppl %.2f", step, ev["eval_loss"], ev["eval_ppl"])
        if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0 and step < total:
            metrics.flush()  # every record up to a checkpoint is on disk before it (resume truncates after it)
            save(step)
            saved_at = step
        maybe_kill("step", info.rank, step)  # TEST-ONLY (runtime/faults.py): a worker dying mid-run
        if signal_at and step == signal_at[0] and main:
            os.kill(os.getpid(), signal_at[1])
        if step < total and pre.should_stop():
            metrics.flush()
            if saved_at != step:
                save(step)
            barrier()
            pre.mark_saved()  # a later signal (Slurm's SIGTERM after the requeue) must not cut the exit short
            if main:
                pre.requeue()
                print(f"[shardtrain] preempted at step {step}: checkpoint saved, exiting with code {EXIT_PREEMPTED}",
                      flush=True)
            preempted = True
            break
    if bar:
        bar.close()
    metrics.flush()
    if main and losses and not preempted and not stopped:
        log.info("done: %d steps, final loss %.4f, %.0f tok/s per device%s", total - start, losses[-1],
                 rec.get("tokens_per_s_per_device", 0.0), _speed_text(rec, per_device=False))
    result = {"losses": losses, "evals": evals, "preempted": preempted, "start_step": start,
              "nonfinite_steps": nonfinite.total, "nonfinite_stop": stopped}
    if not preempted and not stopped:  # a non-finite stop writes nothing: the last checkpoint stays the newest
        save(total)
        save_final(eng, run_dir / rf.FINAL, r.tokenizer, cfg.run.export)  # run.export (runtime/export.py)
    result["memory"] = r.write_memory_report(meter, phase)
    release_shared()
    eng.close()
    if destroy_group:
        from shardtrain.runtime.dist import destroy
        destroy()
    return result


def _throughput_setup(r: Run) -> None:
    from shardtrain.runtime.modeling import checkpointed_layers
    from shardtrain.runtime.stepstats import GlobalTokens, Throughput
    if GlobalTokens.supported(r.train_data, r.sampler):
        r.extra["tokens"] = GlobalTokens(r.train_data, r.sampler)
    try:
        ckpt_layers = len(checkpointed_layers(r.engine.model))
    except Exception:  # noqa: BLE001 - a model without HF checkpointing layers: nothing recomputed
        ckpt_layers = 0
    r.extra["throughput"] = Throughput(r.plan, r.info.world_size, r.info.device.type, ckpt_layers)


def _speed_postfix(rec: dict) -> dict:
    out = {"tok/s/dev": f"{rec.get('tokens_per_s_per_device', 0):.0f}"}
    if "mfu" in rec:
        out.update(tflops=f"{rec['tflops_per_device']:.1f}", mfu=f"{rec['mfu']:.1%}")
    return out


def _speed_text(rec: dict, per_device: bool = True) -> str:
    txt = f", {rec.get('tokens_per_s_per_device', 0):.0f} tok/s/device" if per_device else ""
    if "mfu" in rec:
        txt += f", {rec['tflops_per_device']:.1f} TFLOP/s/device, MFU {rec['mfu']:.1%}"
    return txt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardtrain.runtime.worker", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run directory (run.yaml, plan.json, ...)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, unknown = p.parse_known_args(argv)
    if unknown:
        p.error(f"unknown arguments: {' '.join(unknown)}")
    marker = stop_marker()
    try:
        res = run(args.run_dir)
    except torch.OutOfMemoryError as e:  # recorded for `launch --on-oom replan` (launcher/oom.py)
        from shardtrain.runtime.faults import record_oom
        record_oom(args.run_dir, int(os.environ.get("RANK", "0")), e)
        raise
    code = EXIT_NONFINITE if res["nonfinite_stop"] else EXIT_PREEMPTED if res["preempted"] else 0
    return leave_stop_code(marker, code, res["start_step"] + len(res["losses"]))


if __name__ == "__main__":
    sys.exit(main())
