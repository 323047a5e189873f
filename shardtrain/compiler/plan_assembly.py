"""Plan assembly (pure): the order candidates compete in (``rank_key``: step time, then memory, simpler
mesh, cheaper strategy), each strategy's representative (the fastest fit, else the closest to fitting) and
the Plan with its alternatives and `why` lines (``make_plan``). Split out of compiler/planner.py."""
from __future__ import annotations

from shardtrain.compiler.candidate_eval import PlanCtx
from shardtrain.compiler.loss_choice import loss_auto_reason
from shardtrain.compiler.mesh_reasons import mesh_reasons
from shardtrain.compiler.plan import Candidate, Plan
from shardtrain.compiler.plan_reasons import STRATEGY_ORDER, plan_reasons
from shardtrain.compiler.specs import LossMode, Strategy, TrainSpec


def rank_key(c: Candidate) -> tuple:
    # ties: fewer tp/cp ranks first (simpler mesh), then the cheaper strategy
    return (c.step_time_s, c.per_gpu.total, c.mesh.tp * c.mesh.cp, STRATEGY_ORDER.index(c.strategy))


def _best_per_strategy(candidates: list[Candidate], usable: int | None = None) -> dict[Strategy, Candidate]:
    """Per strategy: the fastest fit, else the one closest to fitting — the least GPU memory, or, among those
    that fit the GPU (``usable``), the least host RAM (a saver that moves bytes to the host must not stand for
    the strategy when host RAM is what runs out: advice.hardware_trials takes its minimum from these)."""
    def short(c: Candidate) -> tuple:
        if usable is not None and c.gpu_need_bytes <= usable:
            return (0, c.cpu_memory_per_node_bytes, c.nvme_bytes, c.per_gpu.total)
        return (1, c.per_gpu.total)
    best: dict[Strategy, Candidate] = {}
    for c in candidates:
        cur = best.get(c.strategy)
        better = (c.fits, -rank_key(c)[0]) > (cur.fits, -rank_key(cur)[0]) if cur else True
        if not c.fits and cur is not None and not cur.fits:
            better = short(c) < short(cur)
        if better:
            best[c.strategy] = c
    return best


def make_plan(ctx: PlanCtx, chosen: Candidate, candidates: list[Candidate], illegal: dict[Strategy, str],
              targets: tuple[str, ...], asked: TrainSpec) -> Plan:
    best = _best_per_strategy(candidates, ctx.usable)
    others = [c for s, c in best.items() if s is not chosen.strategy]
    others.sort(key=lambda c: (not c.fits, rank_key(c)))
    loss_why = (loss_auto_reason(chosen, candidates, ctx.train.runner)
                if ctx.train.loss is LossMode.AUTO else "")
    reasons = plan_reasons(ctx.model, ctx.train, ctx.hw, ctx.usable, chosen, best, illegal, loss_why=loss_why)
    reasons[1:1] = mesh_reasons(ctx.train, asked, ctx.hw, chosen, candidates)
    return Plan(chosen=chosen, alternatives=tuple(others), model=ctx.model, hardware=ctx.hw, train=asked,
                gpu_memory_bytes=ctx.hw.gpu_memory_bytes,
                headroom_bytes=ctx.hw.gpu_memory_bytes - ctx.usable, reasons=tuple(reasons),
                lora_targets=targets)
