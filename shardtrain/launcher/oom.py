"""`shardtrain launch --on-oom replan[:N]`: when a rank runs out of memory, re-plan and resume (issue 13 (g)).

The worker records each out-of-memory error in ``<run dir>/oom/rank{R}.json`` (runtime/faults.py:
phase, step, micro batch, measured peak). After a failed launch the launcher reads those records and,
at most N times (default 2), asks the PUBLIC planner for the next smaller setup. A CUDA OOM carries a
measurement (the device capacity the step exceeded): it calibrates the memory model for this job (see
:func:`calibrated`). Without one (CPU, or no smaller calibrated plan) a ladder, one change per rung:
  1. half the micro batch (more accumulation: the global batch, hence every step's samples and the
     checkpoints, stay the same);
  2. at micro batch 1: full activation checkpointing;
  3. the chunked loss (no full fp32 logits tensor);
  4. activations offloaded to host memory;
  5. the next strategy that shards more (:data:`SHARDING_LADDER`: DDP → ZeRO-1 → ZeRO-2 → FSDP2 grad-op →
     ZeRO-3 → FSDP2 full shard → ZeRO-2 offload → ZeRO-3 optimizer offload → FSDP2 CPU offload → ZeRO-3
     offload) whose plan fits and predicts less per GPU, the other
     settings kept: checkpoints are portable across strategies (issue 21, runtime/portable.py);
then rewrites the run dir and launches again; the workers resume from the last complete checkpoint.
Each change is printed with its reason. On CPU the control path is exercised with the TEST-ONLY
``SHARDTRAIN_TEST_OOM_AT_MICRO_BATCH`` (runtime/faults.py), never with a real OOM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shardtrain import rundir_format as rf

DEFAULT_REPLANS = 2
#: Strategies from the least to the most sharded model state (compiler/memory.py model_state_bytes): the
#: last rung of the ladder moves right along it. ZeRO-Infinity (NVMe) is left out: it needs a path.
SHARDING_LADDER = ("ddp", "zero1", "zero2", "fsdp_shard_grad_op", "zero3", "fsdp_full_shard", "zero2_offload",
                   "zero3_opt_offload", "fsdp_offload", "zero3_offload")


def parse_on_oom(value: str | None) -> int:
    """'replan' -> DEFAULT_REPLANS, 'replan:N' -> N, 'fail'/None -> 0; ValueError otherwise."""
    if value is None or value == "fail":
        return 0
    head, _, n = value.partition(":")
    if head != "replan" or (n and not n.isdigit()):
        raise ValueError(f"--on-oom {value!r}: write replan, replan:N (N re-plans at most) or fail")
    return int(n) if n else DEFAULT_REPLANS


def oom_records(run_dir: Path) -> list[dict]:
    out = []
    for p in sorted((Path(run_dir) / rf.OOM_DIR).glob(rf.OOM_RECORD_GLOB)):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def clear_records(run_dir: Path) -> None:
    for p in (Path(run_dir) / rf.OOM_DIR).glob(rf.OOM_RECORD_GLOB):
        p.unlink(missing_ok=True)


@dataclass(frozen=True)
class Replan:
    cfg: object
    plan: object
    message: str


def calibrated(cfg, plan, records: list[dict]) -> Replan | None:
    """A real device OOM (CUDA): the step needed more than the device's capacity although the memory model
    predicted ``per_gpu.total`` below it, so the model under-predicts this job by at least
    f = capacity / predicted. Re-plan with the same strategy and micro batch "auto" under a budget
    tightened by f (train.headroom raised so that usable' = usable / f): the PUBLIC planner then picks the
    largest setup whose prediction × f fits. None when there is no usable measurement (CPU, or the
    prediction was already over capacity) or nothing fits the tighter budget."""
    from shardtrain.compiler.planner import PlanningError
    from shardtrain.compiler.specs import Device
    from shardtrain.config import pipeline
    from shardtrain.config.schema import ConfigError
    rec = next((r for r in records if r.get("device") == Device.CUDA and r.get("device_capacity_bytes")), None)
    predicted = int(plan.chosen.per_gpu.total)
    if rec is None or predicted <= 0 or rec["device_capacity_bytes"] <= predicted:
        return None
    f = rec["device_capacity_bytes"] / predicted
    headroom = 1 - (1 - cfg.train.headroom) / f
    if not 0 <= headroom < 0.9:
        return None
    try:
        new_cfg, new = pipeline.compile(cfg, {"train.strategy": plan.strategy, "train.micro_batch": "auto",
                                              "train.headroom": round(headroom, 4), **mesh_pins(plan)},
                                        advise=False)
    except (ConfigError, PlanningError, ValueError):
        return None
    c, n = plan.chosen, new.chosen
    if not n.fits or (n.micro_batch_size, n.gradient_checkpointing) == (c.micro_batch_size, c.gradient_checkpointing):
        return None
    msg = (f"rank {rec.get('rank', '?')} ran out of memory in {rec.get('phase', '?')} at step {rec.get('step', '?')} "
           f"although {predicted / 2**30:.1f} GiB was predicted of {rec['device_capacity_bytes'] / 2**30:.1f} GiB: "
           f"calibrated ×{f:.2f} (train.headroom {cfg.train.headroom} → {headroom:.3f}); re-planned: micro batch "
           f"{c.micro_batch_size} → {n.micro_batch_size}, accumulation {c.grad_accum_steps} → {n.grad_accum_steps}"
           + (f", checkpointing {c.gradient_checkpointing.value} → {n.gradient_checkpointing.value}"
              if n.gradient_checkpointing != c.gradient_checkpointing else ""))
    return Replan(new_cfg, new, msg)


def mesh_pins(plan) -> dict[str, object]:
    """The running plan's tp and cp as `parallel.*` overrides: a re-plan after an OOM changes one thing at
    a time (batch split, checkpointing, loss path, then the strategy), not how a layer or a sequence is
    split. dp_replicate × dp_shard stays free: a strategy switch may need another split of the same dp
    ranks (DDP replicates, ZeRO shards), and portable checkpoints reshard on load."""
    m = plan.parallel
    return {"parallel.tp": m.tp, "parallel.cp": m.cp, "parallel.cp_mode": m.cp_mode.value}


def next_plan(cfg, plan, records: list[dict]) -> Replan | None:
    """The next smaller plan after an OOM (None when nothing smaller is left), via the public planner
    with a fixed micro batch / checkpointing (compiler internals are not touched)."""
    cal = calibrated(cfg, plan, records)
    if cal is not None:
        return cal
    from shardtrain.compiler.specs import ActivationOffload, GradCkpt, LossMode
    from shardtrain.config import pipeline
    from shardtrain.config.schema import ConfigError
    from shardtrain.units import fmt_bytes
    c = plan.chosen
    rec = records[0] if records else {}
    where = (f"rank {rec.get('rank', '?')} ran out of memory in {rec.get('phase', '?')} at step {rec.get('step', '?')}"
             + (f" (measured peak {fmt_bytes(rec['measured_peak_bytes'])})" if rec.get("measured_peak_bytes") else ""))
    # The settings already chosen pinned, so each rung changes exactly one thing (the strategy last).
    over: dict[str, object] = {"train.strategy": plan.strategy, "train.micro_batch": c.micro_batch_size,
                               "train.grad_ckpt": c.gradient_checkpointing, **mesh_pins(plan)}
    loss = getattr(c, "loss", None)
    offload = getattr(c, "activation_offload", None)
    if c.micro_batch_size > 1:
        over["train.micro_batch"] = c.micro_batch_size // 2
    elif c.gradient_checkpointing is not GradCkpt.FULL:
        over["train.grad_ckpt"] = GradCkpt.FULL
    elif loss is LossMode.FULL:
        over["train.loss"] = LossMode.CHUNKED
    elif offload is ActivationOffload.NONE:
        over["train.loss"] = loss if loss is not None else LossMode.FULL
        over["train.activation_offload"] = ActivationOffload.CPU
    else:
        return switch_strategy(cfg, plan, over, where)
    try:
        new_cfg, new = pipeline.compile(cfg, over, advise=False)
    except (ConfigError, ValueError):
        return None
    n = new.chosen

    def knobs(x):
        return (x.micro_batch_size, x.gradient_checkpointing, getattr(x, "loss", None),
                getattr(x, "activation_offload", None))
    if knobs(n) == knobs(c):  # the planner did not apply the rung (e.g. offload under full recompute)
        return switch_strategy(cfg, plan, {k: v for k, v in over.items() if not k.startswith("train.activation")},
                               where)
    msg = (f"{where}: re-planned: micro batch {c.micro_batch_size} → {n.micro_batch_size}, accumulation "
           f"{c.grad_accum_steps} → {n.grad_accum_steps}"
           + (f", checkpointing {c.gradient_checkpointing.value} → {n.gradient_checkpointing.value}"
              if n.gradient_checkpointing != c.gradient_checkpointing else "")
           + (f", loss {c.loss.value} → {n.loss.value}" if getattr(c, "loss", None) != getattr(n, "loss", None) else "")
           + (f", activation offload {c.activation_offload.value} → {n.activation_offload.value}"
              if getattr(c, "activation_offload", None) != getattr(n, "activation_offload", None) else "")
           + f" (global batch {plan.train.global_batch_size} unchanged; resuming from the last checkpoint)")
    return Replan(new_cfg, new, msg)


def switch_strategy(cfg, plan, pinned: dict, where: str) -> Replan | None:
    """The last rung: the next strategy along :data:`SHARDING_LADDER` that fits and predicts less memory per
    GPU than the current plan, everything else pinned (None at the end of the ladder)."""
    from shardtrain.config import pipeline
    from shardtrain.config.schema import ConfigError
    from shardtrain.compiler.planner import PlanningError
    from shardtrain.units import fmt_bytes
    cur = plan.strategy.value
    later = SHARDING_LADDER[SHARDING_LADDER.index(cur) + 1:] if cur in SHARDING_LADDER else ()
    now = int(plan.chosen.per_gpu.total)
    for s in later:
        over = {**pinned, "train.strategy": s}
        try:
            new_cfg, new = pipeline.compile(cfg, over, advise=False)
        except (ConfigError, PlanningError, ValueError):
            continue
        if new.chosen.fits and int(new.chosen.per_gpu.total) < now:
            n = new.chosen
            msg = (f"{where}: re-planned: strategy {cur} → {s} (predicted {fmt_bytes(now)} → "
                   f"{fmt_bytes(int(n.per_gpu.total))} per GPU; micro batch {n.micro_batch_size} × accumulation "
                   f"{n.grad_accum_steps}, global batch {plan.train.global_batch_size} unchanged; the checkpoints "
                   "are portable across strategies: resuming from the last one)")
            return Replan(new_cfg, new, msg)
    return None


def accept_new_split(run_dir: Path, cfg, plan) -> None:
    """Record the re-planned config and plan in the run dir before rundir.write_run_dir re-checks it:
    a re-plan after OOM keeps the world size and global batch (the same samples per optimizer step), so
    the run's portable checkpoints stay valid whatever the batch split or strategy."""
    from shardtrain.launcher.rundir import record_config_and_plan
    record_config_and_plan(Path(run_dir), cfg, plan)
