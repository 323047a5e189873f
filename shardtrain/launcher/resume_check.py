"""May this run dir's training state be resumed with a new config and plan? (issue 21: "what the
checkpoint depends on", replacing a hand-kept allow-list). Pure: two config dicts and two plan dicts in,
a :class:`ResumeCheck` out.

Checkpoints are portable (runtime/portable.py: fp32 masters and optimizer states keyed by parameter
name, readable by DDP, FSDP2 and ZeRO-1/2/3 on any number of ranks; the data position is a GLOBAL
sample count). So how the run EXECUTES may change on resume, and the launch says what was re-planned:
``hardware.*``, ``train.strategy``, the micro batch (accumulation adjusts: the global batch stays),
precision (the stored masters are fp32), checkpointing, loss, offload, compile, headroom; ``run.*``
(diagnostics such as ``run.memory_trace``, cadence, paths) never blocks a resume.

Refused: what the stored tensors or the stored position MEAN:
- ``model.*``: the architecture, the initial weights and the tokenizer the state belongs to;
- ``train.method``, ``lora.rank`` / ``lora.alpha`` / ``lora.targets``: which tensors are trained, their
  shapes, and the scale an adapter is applied with;
- ``train.optimizer``: the kind of optimizer state stored (AdamW moments are not Lion momenta);
- ``data.*``: the sample stream the stored position counts in (``data.eval_fraction`` cuts the train split);
- ``train.seq_len``: packed samples are cut at it, so another length is another stream;
- ``train.global_batch``: the samples of one step, which ``train.steps`` and the LR schedule count;
- ``train.seed``: the order of the stream.
The plan's own choices are checked too (the planner may switch method or optimizer when allowed).

The schedule (``train.steps``, ``lr``, ``warmup_steps``, ``min_lr_ratio``) may change: the LR is a pure
function of the step, so the run continues on the NEW schedule from the checkpoint's step — which moves
the LR mid-run. That is allowed with ONE warning line (not refused: training longer is the common
reason), naming both schedules.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Dotted config keys (a trailing "." = the whole section) that a checkpoint depends on; see the docstring.
CHECKPOINT_KEYS = ("model.", "data.", "train.method", "train.optimizer", "train.seq_len", "train.global_batch",
                   "train.seed", "lora.rank", "lora.alpha", "lora.targets")
#: Keys of the LR schedule (runtime/optim.py lr_at): a change is allowed with a warning.
SCHEDULE_KEYS = ("train.steps", "train.lr", "train.warmup_steps", "train.min_lr_ratio")
#: Plan fields the checkpoint depends on (the plan's effective choices, whatever the config asked).
PLAN_DEPENDS = ("method", "optimizer", "global_batch_size", "seq_len")
#: Plan fields a resume may change; printed as "re-planned".
PLAN_REPLANNED = (("world_size", "ranks"), ("strategy", "strategy"), ("micro_batch_size", "micro batch"),
                  ("grad_accum_steps", "accumulation"), ("precision", "precision"),
                  ("gradient_checkpointing", "checkpointing"), ("offload_optimizer", "optimizer offload"),
                  ("offload_params", "parameter offload"), ("parallel", "mesh"))


@dataclass(frozen=True)
class ResumeCheck:
    refused: tuple[str, ...]
    """One ``key: old → new`` per change the checkpoint depends on (empty: the resume may go on)."""
    replanned: str | None
    """``re-planned for the resume: ranks 2 → 1, accumulation 2 → 4`` when the plan's execution changed."""
    schedule: str | None
    """One warning line when the LR schedule changed."""
    other: tuple[str, ...] = ()
    """Other changed keys (hyper-parameters, diagnostics): allowed, listed for the record."""

    def error(self, run_dir) -> str:
        """The multi-line refusal (real line breaks, one change per line)."""
        return (f"run dir {run_dir} holds checkpoints that depend on settings this config changes:\n  "
                + "\n  ".join(self.refused)
                + "\nStart fresh there with --no-resume (moves the old state to previous/), use another --run-dir "
                  "(or run.name), or put the old values back. Hardware, strategy, micro batch, precision, the "
                  "schedule and run.* may change on resume.")


def config_diff(old: Mapping, new: Mapping) -> dict[str, tuple]:
    """Dotted keys whose values differ between two RunConfig dicts: {key: (old, new)}."""
    out = {}
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        if not isinstance(a, Mapping) or not isinstance(b, Mapping):
            if a != b:
                out[section] = (a, b)
            continue
        for k in sorted(set(a) | set(b)):
            if _norm(a.get(k)) != _norm(b.get(k)):
                out[f"{section}.{k}"] = (a.get(k), b.get(k))
    return out


def _norm(v):
    """One spelling per value: a list is a tuple, a one-item list equals its item (``targets: all-linear``
    is written back as ``['all-linear']`` when a config is re-compiled)."""
    if isinstance(v, (list, tuple)):
        v = tuple(_norm(x) for x in v)
        return v[0] if len(v) == 1 else v
    return v


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _v(x) -> str:
    if isinstance(x, Mapping) and "tp" in x:  # a plan's "parallel" (ParallelDims.to_json)
        from shardtrain.compiler.specs import ParallelDims
        return ParallelDims.from_json(x).label()
    return getattr(x, "value", x) if not isinstance(x, str) else x


def _lora_shape(plan: Mapping):
    lo = ((plan.get("spec") or {}).get("train") or {}).get("lora") or {}
    return None if plan.get("method") == "full" else (lo.get("rank"), lo.get("alpha"), lo.get("targets"),
                                                       plan.get("lora_targets"))


def check(old_cfg: Mapping, new_cfg: Mapping, old_plan: Mapping, new_plan: Mapping) -> ResumeCheck:
    """Compare the run dir's run.yaml / plan.json dicts with the new launch's (see the module docstring)."""
    diff = config_diff(old_cfg, new_cfg)
    if all(((c.get("train") or {}).get("method") or "full") == "full" for c in (old_cfg, new_cfg)):
        diff = {k: v for k, v in diff.items() if not k.startswith("lora.")}  # ignored by full training
    refused = [f"{k}: {a!r} → {b!r}" for k, (a, b) in diff.items() if _matches(k, CHECKPOINT_KEYS)]
    if old_plan:
        for k in PLAN_DEPENDS:
            if old_plan.get(k) != new_plan.get(k) and not any(r.startswith(f"train.{k}") for r in refused):
                refused.append(f"plan {k}: {old_plan.get(k)!r} → {new_plan.get(k)!r}")
        if _lora_shape(old_plan) != _lora_shape(new_plan) and not any(r.startswith("lora.") for r in refused):
            refused.append(f"plan LoRA (rank, alpha, targets): {_lora_shape(old_plan)} → {_lora_shape(new_plan)}")
    changes = [f"{label} {_v(old_plan.get(k))} → {_v(new_plan.get(k))}" for k, label in PLAN_REPLANNED
               if old_plan and old_plan.get(k) != new_plan.get(k)]
    replanned = f"re-planned for the resume: {', '.join(changes)}" if changes else None
    sched = {k: v for k, v in diff.items() if k in SCHEDULE_KEYS}
    schedule = None
    if sched:
        schedule = ("the LR schedule changes on resume (" + ", ".join(f"{k} {a} → {b}" for k, (a, b) in sched.items())
                    + "): from the checkpoint's step on, the LR follows the new schedule")
    other = tuple(k for k in diff if not _matches(k, CHECKPOINT_KEYS) and k not in SCHEDULE_KEYS)
    return ResumeCheck(tuple(refused), replanned, schedule, other)
