""""To fit, try" advice that is verified: every candidate change is applied to the run config and
RE-PLANNED; only the changes that fit are shown, cheapest first, with the re-planned total and step time.

Pure (no torch, no subprocess, no env vars, no I/O): the compiler never reads run configs, so
re-planning is a callable injected by config/pipeline.py, the one config -> plan owner:
``replan({"train.loss": "chunked"}) -> Plan | None``: the plan of the config with those ``--set``
overrides (fitting, or the least-memory one that does not), None when the change is invalid there.

Cheapest first: :class:`ChangeKind` (savers that keep the training math, then hardware, then changes
to the job's math), within a kind by re-planned step time. The search is bounded (``MAX_REPLANS``
re-plans of ~10-20 ms each) so `shardtrain plan` still answers well under 2 s:
  1. each single change: the discrete ones (:func:`candidate_changes`) and, for hardware sizes, the
     smallest value that fits (:func:`hardware_trials`: GPU memory, host RAM and NVMe capacity from the
     evaluated candidates' own needs; GPU count by doubling);
  2. only when no single change fits: pairs of the changes that brought the plan closer to fitting
     (:func:`distance`), and the hardware minimums on top of the closest ones; pairs of savers also
     when no single saver fits (chunked loss AND activation offload before "buy a bigger GPU").
Suggestions are config keys and values (``Suggestion.set``, `plan --json`'s "suggestions"); commands
print them as the flags to append (report.suggestion_args: a flag beats --set).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from shardtrain.compiler.plan import Candidate, ChangeKind, Plan, Suggestion
from shardtrain.compiler.specs import ActivationOffload, CkptOffload, GradCkpt, LossMode, Method, OffloadDevice, Optimizer
from shardtrain.units import fmt_bytes

Overrides = tuple[tuple[str, str], ...]
Replan = Callable[[Mapping[str, str]], "Plan | None"]

GiB = 2**30
MAX_REPLANS = 24
"""Re-plans per advice (each 5-40 ms on one core, the most for a 1-GPU job with 7 micro batches to try):
keeps `plan` well under 2 s (tests/test_advice.py measures it)."""
PAIR_BASES = 2
"""Closest single changes that pairs are built on when no single change fits."""
TRIALS_PER_SIZE = 2
"""Values tried per hardware memory size: the first is exact unless another limit interferes."""
MAX_GPU_COUNT_TRIALS = 5
MIN_PROGRESS = 0.05
"""A hardware size's next value is tried only while the last one got at least 5% closer to fitting."""
MAX_GPU_MEMORY_BYTES = 256 * GiB
"""No GPU-memory suggestion above this: the largest accelerators sold (AMD MI325X 256 GB; NVIDIA B200
192 GB). "7959GiB per GPU" is a verified but useless answer."""
MAX_CPU_MEMORY_BYTES = 4 * 2**40
"""No host-RAM suggestion above this (per node; 8-GPU servers ship with 1-4 TiB, e.g. DGX B200 4 TiB)."""
MAX_GPUS_PER_NODE = 8
MAX_NODES = 64
MIN_SEQ_LEN = 256
NVME_PLACEHOLDER = "/local_nvme"
"""Shown for hardware.nvme_path: any local NVMe directory (plan does not read it)."""


@dataclass(frozen=True)
class Change:
    """One candidate change: run-config keys -> values (as `--set` takes them) and what it costs."""
    set: Overrides
    kind: ChangeKind


def usable_bytes(p: Plan) -> int:
    return p.gpu_memory_bytes - p.headroom_bytes


def _over(p: Plan, c: Candidate) -> float:
    """The candidate's need / limit for its tightest resource (<= 1: it fits)."""
    hw = p.hardware
    r = [c.gpu_need_bytes / max(1, usable_bytes(p)), c.cpu_memory_per_node_bytes / max(1, hw.cpu_memory_bytes)]
    if c.nvme_bytes:
        r.append(c.nvme_bytes / hw.nvme_capacity_bytes if hw.nvme_capacity_bytes else math.inf)
    return max(r)


def distance(p: Plan) -> float:
    """How far the plan's nearest evaluated candidate is from fitting (its tightest need / limit)."""
    return min(_over(p, c) for c in (p.chosen, *p.alternatives))


def candidate_changes(p: Plan) -> list[Change]:
    """The discrete changes worth re-planning for this plan's job (the sizes are hardware_trials)."""
    t, hw = p.train, p.hardware
    S, H, J = ChangeKind.SAVER, ChangeKind.HARDWARE, ChangeKind.JOB
    out: list[tuple[str, str, ChangeKind]] = []
    if t.loss is LossMode.FULL:
        out.append(("train.loss", LossMode.CHUNKED.value, S))
    if t.activation_offload is ActivationOffload.NONE:
        out.append(("train.activation_offload", ActivationOffload.CPU.value, S))
    if t.grad_ckpt not in (GradCkpt.AUTO, GradCkpt.FULL):
        out.append(("train.grad_ckpt", GradCkpt.AUTO.value, S))   # auto includes full
    # the long-context savers (compiler/savers.py): set off or to too few tiles, give them back to auto
    if t.tiled_mlp is not None:
        out.append(("train.tiled_mlp", "auto", S))
    if t.ckpt_offload is CkptOffload.OFF:
        out.append(("train.ckpt_offload", CkptOffload.AUTO.value, S))
    if t.micro_batch_size not in (None, 1):
        out.append(("train.micro_batch", "auto", S))
    if t.strategy is not None:
        out.append(("train.strategy", "auto", S))
    nvme_strategy = t.strategy is None or OffloadDevice.NVME in (t.strategy.offload_optimizer,
                                                                t.strategy.offload_params)
    if not hw.nvme_path and t.method is not Method.QLORA and nvme_strategy:   # QLoRA's 4-bit weights stay on GPU
        out.append(("hardware.nvme_path", NVME_PLACEHOLDER, H))
    if t.method is Method.FULL:
        out.append(("train.method", Method.LORA.value, J))
    if t.method is not Method.QLORA:
        out.append(("train.method", Method.QLORA.value, J))
    if t.optimizer in (Optimizer.ADAMW, Optimizer.LION):
        out.append(("train.optimizer", Optimizer.ADAMW8BIT.value, J))
    if t.seq_len // 2 >= MIN_SEQ_LEN:
        out.append(("train.seq_len", str(t.seq_len // 2), J))
    return [Change(((k, v),), kind) for k, v, kind in out]


def _gib_up(n: float) -> int:
    return max(1, math.ceil(n / GiB))


def _sizes(values: Iterable[int], current: int) -> list[int]:
    return sorted({v for v in values if v > current})[:TRIALS_PER_SIZE]


def hardware_trials(p: Plan) -> list[list[Overrides]]:
    """Per hardware size, the values to try in ascending order: the first that fits is the minimum.

    GPU memory: a candidate whose only shortfall is GPU memory fits once usable = memory × (1 - headroom)
    reaches its total, so each such candidate's need (rounded up to GiB) is exact; the smallest is the
    least memory at which the planner's evaluated candidates fit. Host RAM and NVMe capacity: the same
    with each candidate's need. GPU count: doubling (GPUs per node up to 8, then nodes), keeping the
    global batch (it must divide by the world size)."""
    hw, h = p.hardware, p.train.headroom_fraction
    cands = (p.chosen, *p.alternatives)
    gpu_ok = [c for c in cands if c.gpu_need_bytes <= usable_bytes(p)]
    cpu_ok = lambda c: c.cpu_memory_per_node_bytes <= hw.cpu_memory_bytes   # noqa: E731
    nvme_ok = lambda c: c.nvme_bytes <= hw.nvme_capacity_bytes               # noqa: E731
    out: list[list[Overrides]] = []
    mem = _sizes((v for c in cands if cpu_ok(c) and nvme_ok(c)
                  if (v := _gib_up(c.gpu_need_bytes / (1 - h)) * GiB) <= MAX_GPU_MEMORY_BYTES), hw.gpu_memory_bytes)
    out.append([(("hardware.gpu_memory", f"{v // GiB}GiB"),) for v in mem])
    cpu = _sizes((v for c in gpu_ok if nvme_ok(c)
                  if (v := _gib_up(c.cpu_memory_per_node_bytes) * GiB) <= MAX_CPU_MEMORY_BYTES), hw.cpu_memory_bytes)
    out.append([(("hardware.cpu_memory", f"{v // GiB}GiB"),) for v in cpu])
    if hw.nvme_path:
        nv = _sizes((_gib_up(c.nvme_bytes) * GiB for c in gpu_ok if cpu_ok(c)), hw.nvme_capacity_bytes)
        out.append([(("hardware.nvme_capacity", f"{v // GiB}GiB"),) for v in nv])
    out.append(_gpu_count_trials(p))
    return [trials for trials in out if trials]


def _gpu_count_trials(p: Plan) -> list[Overrides]:
    hw, g = p.hardware, p.train.global_batch_size
    sizes, n, k = [], hw.nodes, hw.gpus_per_node
    if n == 1:
        while k * 2 <= MAX_GPUS_PER_NODE:
            k *= 2
            sizes.append((n, k))
    while n * 2 <= MAX_NODES:
        n *= 2
        sizes.append((n, k))
    out = []
    for n, k in sizes:
        if g % (n * k) == 0:
            o = ((("hardware.nodes", str(n)),) if n != hw.nodes else ()) + \
                ((("hardware.gpus_per_node", str(k)),) if k != hw.gpus_per_node else ())
            out.append(o)
    return out[:MAX_GPU_COUNT_TRIALS]


class _Search:
    """Memoised, budgeted re-planning."""

    def __init__(self, replan: Replan, budget: int):
        self.replan, self.left, self.memo = replan, budget, {}

    def plan(self, o: Overrides) -> Plan | None:
        key = tuple(sorted(o))
        if key not in self.memo:
            if self.left <= 0:
                return None
            self.left -= 1
            self.memo[key] = self.replan(dict(key))
        return self.memo[key]

    def first_fit(self, base: Overrides, trials: list[Overrides], start: float) -> tuple[Overrides, Plan] | None:
        """The first of the ascending trials that fits. Stops when one gets less than MIN_PROGRESS closer
        than the step before (``start``: the distance without them): more GPUs do not help a job whose
        replicated states alone overflow, and each further trial would cost a re-plan."""
        last = start
        for o in trials:
            p = self.plan(base + o)
            if p is None:
                return None
            if p.chosen.fits:
                return base + o, p
            if distance(p) > last * (1 - MIN_PROGRESS):
                return None
            last = distance(p)
        return None


def _suggestion(o: Overrides, kind: ChangeKind, p: Plan) -> Suggestion:
    return Suggestion(set=o, total_bytes=p.chosen.per_gpu.total, step_time_s=p.chosen.step_time_s,
                      strategy=p.chosen.strategy, kind=kind)


def _costlier(a: ChangeKind, b: ChangeKind) -> ChangeKind:
    return a if a.rank >= b.rank else b


def advise(plan: Plan, replan: Replan, *, budget: int = MAX_REPLANS) -> tuple[tuple[Suggestion, ...], int]:
    """(the changes that fit, cheapest first; how many re-plans were run) for a plan that does not fit.

    Pairs are searched when no single change fits; pairs of savers also when no single saver fits (a
    user who cannot buy hardware wants "chunked loss AND activation offload" before "a bigger GPU")."""
    s = _Search(replan, budget)
    fits: dict[Overrides, Suggestion] = {}
    closer = _singles(plan, s, fits)
    if not fits:
        _pairs(closer, s, fits, hardware=True)
    elif not any(x.kind is ChangeKind.SAVER for x in fits.values()):
        _pairs([c for c in closer if c[1].kind is ChangeKind.SAVER], s, fits, hardware=False)
    ranked = sorted(fits.values(), key=lambda x: (x.kind.rank, x.step_time_s, x.total_bytes, x.set))
    return tuple(ranked), budget - s.left


def _keep(fits: dict[Overrides, Suggestion], o: Overrides, kind: ChangeKind, p: Plan) -> None:
    fits.setdefault(tuple(sorted(o)), _suggestion(o, kind, p))


def _singles(plan: Plan, s: _Search, fits: dict) -> list[tuple[float, Change, Plan]]:
    """Re-plan each single change; keep those that fit; return the others that came closer, closest first."""
    base, closer = distance(plan), []
    for ch in candidate_changes(plan):
        p = s.plan(ch.set)
        if p is None:
            continue
        if p.chosen.fits:
            _keep(fits, ch.set, ch.kind, p)
        elif distance(p) < base:
            closer.append((distance(p), ch, p))
    for trials in hardware_trials(plan):
        hit = s.first_fit((), trials, base)
        if hit:
            _keep(fits, hit[0], ChangeKind.HARDWARE, hit[1])
    return sorted(closer, key=lambda x: (x[0], x[1].kind.rank))


def _pairs(closer: list[tuple[float, Change, Plan]], s: _Search, fits: dict, *, hardware: bool) -> None:
    """Each of the PAIR_BASES closest changes with each later one (and, with ``hardware``, with the
    smallest hardware size that fits on top of it)."""
    for i, (da, a, pa) in enumerate(closer[:PAIR_BASES]):
        keys = {k for k, _ in a.set}
        still = {c.set for c in candidate_changes(pa)}   # e.g. no NVMe once the method is QLoRA
        for _, b, _ in closer[i + 1:]:
            if b.set not in still or keys & {k for k, _ in b.set}:
                continue
            p = s.plan(a.set + b.set)
            if p is not None and p.chosen.fits:
                _keep(fits, a.set + b.set, _costlier(a.kind, b.kind), p)
        if hardware:
            for trials in hardware_trials(pa):
                hit = s.first_fit(a.set, [t for t in trials if not keys & {k for k, _ in t}], da)
                if hit:
                    _keep(fits, hit[0], _costlier(a.kind, ChangeKind.HARDWARE), hit[1])


# ----------------------------------------------------------------------------- text
Spell = Callable[[Suggestion], str]


def set_args(sug: Suggestion) -> str:
    """The suggestion as ``--set KEY=VALUE`` arguments (the spelling without the flag table, which lives
    in config/flags.py; commands print flags instead: report.suggestion_args)."""
    return " ".join(f"--set {k}={v}" for k, v in sug.set)


def fmt_step_time(seconds: float) -> str:
    """"~3.9 s/step", "~3,879 s/step" (not "3.88e+03")."""
    return f"~{seconds:.3g} s/step" if seconds < 100 else f"~{seconds:,.0f} s/step"


def describe(sug: Suggestion, spell: Spell = set_args) -> str:
    note = " (any local NVMe directory)" if any(k == "hardware.nvme_path" for k, _ in sug.set) else ""
    return (f"{spell(sug)}{note} -> {sug.strategy.value}, {fmt_bytes(sug.total_bytes)} per GPU, "
            f"{fmt_step_time(sug.step_time_s)}")


def no_fit_summary(least: Candidate, usable: int) -> str:
    """What the least-memory plan needs, each shortfall once (its why_not)."""
    gpu = "" if least.gpu_need_bytes > usable else \
        f" (its {fmt_bytes(least.gpu_need_bytes)} per GPU fit in {fmt_bytes(usable)} usable)"
    return (f"nothing fits: the smallest plan ({least.strategy.value}, micro batch {least.micro_batch_size}, "
            f"checkpointing {least.gradient_checkpointing.value}) " + "; ".join(least.why_not) + gpu + ".")


def assumed_note(plan: Plan) -> str:
    """Say that a limit the verdict depends on was assumed, not given."""
    assumed = dict(plan.assumed)
    c = plan.chosen
    if "hardware.cpu_memory" in assumed and c.cpu_memory_per_node_bytes > plan.hardware.cpu_memory_bytes:
        return (f" Host RAM {fmt_bytes(assumed['hardware.cpu_memory'])} per node is an assumption "
                "(hardware.cpu_memory not given): give the real figure with --cpu-memory.")
    if "hardware.nvme_capacity" in assumed and c.nvme_bytes > plan.hardware.nvme_capacity_bytes:
        return (f" NVMe capacity {fmt_bytes(assumed['hardware.nvme_capacity'])} per node is an assumption "
                "(hardware.nvme_capacity not given): give the real figure with --nvme-capacity.")
    return ""


def no_fit_message(plan: Plan, replans: int, spell: Spell = set_args) -> str:
    """The one-paragraph no-fit message: what the smallest plan needs, the assumption it rests on, and
    the verified suggestions (or that none of the re-planned changes fits)."""
    head = no_fit_summary(plan.chosen, usable_bytes(plan)) + assumed_note(plan)
    if plan.suggestions:
        return head + " To fit, try (each re-planned, cheapest first): " + \
            "; or ".join(describe(x, spell) for x in plan.suggestions) + "."
    return head + (f" No single change, nor a pair of them, fits ({replans} re-planned): a smaller model, "
                   "a shorter sequence or more/larger GPUs than tried.")
