"""Enumerate strategy × checkpointing × micro batch (× optimizer, method where allowed), keep what
fits, choose the fastest, and explain why. Pure: no I/O, no torch.

This module owns the search's driver: which strategies, meshes, methods, optimizers and checkpointing it
walks, level by level of tp × cp (``plan``), and ``plan --max``'s probes that stop at the first fit
(``first_fit`` / ``plan_fits``). The parts live in: compiler/plan_rules.py (what is refused before any
evaluation, the errors), compiler/candidate_eval.py (one candidate's memory, fit rule and step time),
compiler/search_lines.py (the pruned search over one (strategy, mesh) pair, per loss path) and
compiler/plan_assembly.py (ranking and the Plan). Callers import from here (re-exported below)."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from shardtrain.compiler.advice import no_fit_summary
from shardtrain.compiler.candidate_eval import PlanCtx, candidate_memory, evaluate_candidate, model_states
from shardtrain.compiler.candidate_eval import evaluate_phases  # noqa: F401  (re-exported)
from shardtrain.compiler.inventory import TensorGroup, resolve_lora_targets, tensor_inventory
from shardtrain.compiler.mesh import mesh_illegal_reason, meshes
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.plan import Candidate, Plan
from shardtrain.compiler.plan_assembly import make_plan, rank_key
from shardtrain.compiler.plan_reasons import STRATEGY_ORDER, ordinal  # noqa: F401  (re-exported)
from shardtrain.compiler.plan_rules import (MAX_AUTO_MICRO_BATCH, NoFitError, PlanningError,  # noqa: F401
                                            illegal_reason, micro_batch_options, no_mesh_text, runner_refusal)
from shardtrain.compiler.runner import runner_path
from shardtrain.compiler.savers import saver_options, tiled_mlp_mesh_reason
from shardtrain.compiler.search_lines import savers_shrink, search_lines
from shardtrain.compiler.specs import GradCkpt, HardwareSpec, Method, Optimizer, ParallelDims, Strategy, TrainSpec

_CKPT_ORDER = (GradCkpt.NONE, GradCkpt.SELECTIVE, GradCkpt.OP, GradCkpt.FULL)   # least to most saving


def _normalise(train: TrainSpec, hw: HardwareSpec) -> TrainSpec:
    """--strategy fsdp_hybrid_shard is the old spelling of HSDP: fsdp_full_shard with one replica per node
    (dp_replicate = nodes) unless parallel.dp_replicate / dp_shard say otherwise."""
    if train.strategy is not Strategy.FSDP_HYBRID_SHARD:
        return train
    req = train.parallel
    if req.dp_replicate is None and req.dp_shard is None and hw.nodes > 1:
        req = dataclasses.replace(req, dp_replicate=hw.nodes)
    return dataclasses.replace(train, strategy=Strategy.FSDP_FULL_SHARD, parallel=req)


def _levels(train: TrainSpec) -> int:
    """How many tp × cp levels past the first that fits the search goes on (forced dims: all of them).
    More model-splitting than needed only adds collectives (compiler/cost.py), so the search stops one
    level after the first level with a fitting plan: it stays interactive on 1,024 GPUs."""
    return 10**9 if not train.parallel.is_auto else 1


@dataclass(frozen=True)
class _Probed:
    """A candidate that missed, as plan_fits' search sees it: the step time is never read before a fit."""
    why_not: tuple[str, ...]
    fits: bool = False
    step_time_s: float = 0.0


class _FirstFit(Exception):
    """plan_fits: the search met a candidate that fits (nothing more to learn)."""


def first_fit(model: ModelSpec, hw: HardwareSpec, train: TrainSpec,
              prefer: tuple = ()) -> tuple[Method, Optimizer, Strategy, ParallelDims] | None:
    """The (method, optimizer, strategy, mesh) of a candidate that fits, or None where ``plan`` would raise:
    plan_fits with the pair it found, searched first among ``prefer`` (pairs that fit at a nearby value)."""
    try:
        _search(model, hw, train, probe=True, prefer=prefer)
    except _FirstFit as found:
        return found.args[0]
    except PlanningError:
        return None
    return None


def plan_fits(model: ModelSpec, hw: HardwareSpec, train: TrainSpec) -> bool:
    """Whether ``plan`` would return a plan that fits (True) or raise (False), for ``plan --max``'s probes
    (compiler/maxfit.py). The same search as ``plan``, in the same order, but each candidate's memory only
    (no step time) and stopping at the first fit: before its first fit the search never reads a step time
    (its bounds are still infinite), so it meets exactly the candidates ``plan`` meets up to that point."""
    return first_fit(model, hw, train) is not None


def plan(model: ModelSpec, hw: HardwareSpec, train: TrainSpec) -> Plan:
    """Choose the fastest configuration that fits; raise NoFitError if none does."""
    return _search(model, hw, train, probe=False)


def _search(model: ModelSpec, hw: HardwareSpec, train: TrainSpec, probe: bool, prefer: tuple = ()) -> Plan | None:
    usable = int(hw.gpu_memory_bytes * (1 - train.headroom_fraction))
    asked = train
    train = _normalise(train, hw)
    ctx = PlanCtx(model, hw, train, usable)
    if train.strategy is not None:
        strategies = [train.strategy]
    else:
        strategies = [s for s in STRATEGY_ORDER if s is not Strategy.FSDP_HYBRID_SHARD]
    try:
        refusal = runner_refusal(train)
    except ValueError as e:   # a runner_transformers that is no version
        refusal = str(e)
    if refusal:
        raise PlanningError(refusal)
    if train.parallel.tp is not None:   # a forced tiled MLP on a forced tp mesh: one line, not one per strategy
        refusal = tiled_mlp_mesh_reason(train, ParallelDims(tp=train.parallel.tp))
        if refusal:
            raise PlanningError(refusal)
    op_ok = runner_path(train.runner, train.runner_transformers).op_ckpt
    ckpts = ([c for c in _CKPT_ORDER if op_ok or c is not GradCkpt.OP] if train.grad_ckpt is GradCkpt.AUTO
             else [train.grad_ckpt])
    optimizers = [train.optimizer]
    if train.allow_optimizer_change and Optimizer.ADAMW8BIT not in optimizers:
        optimizers.append(Optimizer.ADAMW8BIT)
    methods = [train.method]
    if train.allow_method_change and train.method is Method.FULL:
        methods += [Method.LORA, Method.QLORA]
    targets: tuple[str, ...] = ()
    candidates: list[Candidate] = []
    illegal: dict[Strategy, str] = {}
    mesh_illegal: dict[Strategy, str] = {}  # why a forced mesh cannot run, per strategy
    batch_error: list[str] = []
    # (strategy, mesh) pairs grouped by tp × cp: the search walks the levels upwards (_levels)
    by_level: dict[int, list[tuple[Strategy, ParallelDims]]] = {}
    for s in strategies:
        for mesh in meshes(model, hw, train, s):
            by_level.setdefault(mesh.tp * mesh.cp, []).append((s, mesh))
    def group_of(method: Method) -> tuple[TensorGroup, ...]:
        nonlocal targets
        if method is not Method.FULL:
            try:
                targets = resolve_lora_targets(model, train.lora.targets)
            except ValueError as e:
                raise PlanningError(str(e)) from None
        return tensor_inventory(model, method, train.lora.rank, targets or train.lora.targets)

    def pair(method: Method, groups: tuple[TensorGroup, ...], opt: Optimizer, s: Strategy,
             mesh: ParallelDims) -> None:
        """Search one (method, optimizer, strategy, mesh): its candidates go to ``candidates``."""
        reason = illegal_reason(s, opt, method, train.precision, hw)
        if reason:
            illegal.setdefault(s, reason)
            return
        reason = mesh_illegal_reason(s, mesh, model, hw, train, method) or tiled_mlp_mesh_reason(train, mesh)
        if reason:
            # an auto mesh that cannot run is just not a candidate; a forced one says why
            if not train.parallel.is_auto:
                illegal.setdefault(s, reason)
                mesh_illegal.setdefault(s, reason)
            return
        try:
            micros = micro_batch_options(train, hw, mesh.dp)
        except PlanningError as e:
            batch_error.append(str(e))
            return

        def ev(ck, mb, d_ok, sv):
            accum = train.global_batch_size // (mb * mesh.dp)
            ms = model_states(model, groups, s, hw, method, train.precision, opt, d_ok, accum, mesh)
            if probe:
                x = candidate_memory(ctx, s, ck, mb, opt, method, d_ok, groups, sv, ms, mesh)
                if x.fits:
                    raise _FirstFit((method, opt, s, mesh))
                return _Probed(x.why_not)
            c = evaluate_candidate(ctx, s, ck, mb, opt, method, d_ok, groups, sv, ms, mesh)
            candidates.append(c)
            return c
        # activation offload is a permission and tiled MLP / checkpoint offload auto: each
        # combination is evaluated, the fastest fitting candidate wins (compiler/savers.py)
        shrink = functools.partial(savers_shrink, model, train, mesh)
        search_lines(ev, s, mesh, ckpts, micros, saver_options(model, train, mesh), train, shrink)

    if probe:
        # whether anything fits does not depend on the order of the pairs (before its first fit each pair's
        # search reads nothing of the others'), so the caller's ``prefer`` (the pair that fit at a nearby
        # value) goes first
        inventories = {method: group_of(method) for method in methods}
        work = [(method, inventories[method], opt, s, mesh) for level in sorted(by_level) for method in methods
                for opt in optimizers for s, mesh in by_level[level]]
        work.sort(key=lambda w: (w[0], w[2], w[3], w[4]) not in prefer)
        for w in work:
            pair(*w)
        return None
    extra = None
    for level in sorted(by_level):
        if extra is not None:
            if extra <= 0:
                break
            extra -= 1
        for method in methods:
            groups = group_of(method)
            for opt in optimizers:
                for s, mesh in by_level[level]:
                    pair(method, groups, opt, s, mesh)
        if extra is None and any(c.fits for c in candidates):
            extra = _levels(train)
    if not candidates:
        if batch_error:  # the user's batch numbers, at the largest data-parallel size tried
            raise PlanningError(batch_error[0])
        forced = train.strategy.value if train.strategy else "every strategy"
        # a forced mesh that no engine runs: its own reasons (the DDP one only when it is the only engine)
        mesh_msgs = {r for st, r in mesh_illegal.items() if st is not Strategy.DDP or len(mesh_illegal) == 1}
        msgs = (sorted(mesh_msgs) or sorted(set(illegal.values())) or batch_error[:1]
                or [no_mesh_text(train.parallel, hw)])
        raise PlanningError(f"{forced}: " + "; ".join(msgs))
    fitting = sorted((c for c in candidates if c.fits), key=rank_key)
    if not fitting:
        least = min(candidates, key=lambda c: (c.gpu_need_bytes, rank_key(c)))
        p = make_plan(ctx, least, candidates, illegal, targets, asked)
        raise NoFitError(no_fit_summary(least, ctx.usable), p)
    return make_plan(ctx, fitting[0], candidates, illegal, targets, asked)
