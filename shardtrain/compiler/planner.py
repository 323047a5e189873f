"""Enumerate strategy × checkpointing × micro batch (× optimizer, method where allowed), keep what
fits, choose the fastest, and explain why. Pure: no I/O, no torch."""
from __future__ import annotations

import contextvars
import dataclasses
import functools
from dataclasses import dataclass

from shardtrain.compiler.allocator import predict as predict_allocator
from shardtrain.compiler.activations import (activation_host_bytes, checkpointed_layer_count,
                                             resolve_loss, resolved_ckpt_fraction, tokens_per_rank)
from shardtrain.compiler.advice import no_fit_summary
from shardtrain.compiler.cost import step_time
from shardtrain.compiler.inventory import TensorGroup, resolve_lora_targets, tensor_inventory, trainable_params
from shardtrain.compiler.memory import CUDA_CONTEXT_BYTES, host_bytes_per_node, model_state_bytes, shard_group_size
from shardtrain.compiler.mesh import mesh_illegal_reason, meshes
from shardtrain.compiler.mesh_reasons import mesh_reasons
from shardtrain.compiler.loss_choice import loss_auto_reason
from shardtrain.compiler.op_ckpt import recompute_fraction
from shardtrain.compiler.runner import runner_path
from shardtrain.compiler.plan_reasons import STRATEGY_ORDER, ordinal, plan_reasons  # noqa: F401  (re-exported)
from shardtrain.compiler.phases import candidate_phases, fsdp_side_stream_pools
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.plan import Candidate, Plan
from shardtrain.compiler.savers import (Savers, ckpt_input_bytes, dominates, saver_options, savers_only_shrink,
                                        tiled_mlp_mesh_reason, tiled_saved_reduction_per_token)
from shardtrain.compiler.specs import (ActivationOffload, Engine, GradCkpt, HardwareSpec, LossMode, Method,
                                       OffloadDevice, Optimizer, ParallelDims, ParallelRequest, Precision, Strategy,
                                       TrainSpec)
from shardtrain.units import fmt_bytes

MAX_AUTO_MICRO_BATCH = 64
_CKPT_ORDER = (GradCkpt.NONE, GradCkpt.SELECTIVE, GradCkpt.OP, GradCkpt.FULL)   # least to most saving


class PlanningError(ValueError):
    """Bad input for planning: the message says what to change."""


class NoFitError(PlanningError):
    """Nothing fits; carries the least-memory plan so callers can still show it."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message)
        self.plan = plan


def illegal_reason(strategy: Strategy, optimizer: Optimizer, method: Method, precision: Precision,
                   hw: HardwareSpec) -> str | None:
    """Why this combination cannot run (with the fix), or None. Mirrors engine constraints."""
    off = strategy.offload_optimizer if strategy.engine is Engine.DEEPSPEED else OffloadDevice.NONE
    if off is not OffloadDevice.NONE and optimizer not in (Optimizer.ADAMW, Optimizer.LION):
        name = {Optimizer.ADAMW8BIT: "8-bit AdamW"}.get(optimizer, optimizer.value)
        return (f"{name} cannot run with ZeRO-Offload ({strategy.value}): DeepSpeed offloads only to its "
                f"CPU optimizers; set optimizer: adamw (DeepSpeedCPUAdam) or a strategy without offload")
    if off is OffloadDevice.NVME and optimizer is not Optimizer.ADAMW:
        return "ZeRO-Infinity swaps only DeepSpeedCPUAdam states: set optimizer: adamw"
    if strategy is Strategy.ZERO_INFINITY and not hw.nvme_path:
        return "zero_infinity needs an NVMe directory: set hardware.nvme_path (--nvme-path)"
    if strategy.engine is Engine.FSDP and optimizer is Optimizer.ADAMW8BIT:
        return ("bitsandbytes 8-bit optimizers do not handle FSDP2 DTensor shards: use a ZeRO "
                "strategy or DDP with adamw8bit, or optimizer: adamw with FSDP")
    if method is Method.QLORA and strategy.offload_params is not OffloadDevice.NONE and strategy.engine is Engine.DEEPSPEED:
        return "QLoRA's 4-bit weights cannot be offloaded by ZeRO-3 param offload: use zero3 or zero2_offload"
    if precision.is_bf16 and not hw.supports_bf16:
        return f"{hw.gpu_name} has no bf16: set precision: fp16"
    if precision is Precision.BF16_PURE and strategy.engine is Engine.DEEPSPEED:
        # DeepSpeed 0.19.8 has a pure-bf16 mode (bf16.bf16_master_weights_and_grads + bf16_optimizer_states),
        # but it keeps a separate bf16 master partition next to the module's bf16 params: not modelled here
        return (f"precision bf16_pure is planned for DDP and FSDP2 only, not DeepSpeed ({strategy.value}): "
                f"set strategy: ddp / fsdp_full_shard, or precision: bf16")
    return None


@dataclass(frozen=True)
class _Ctx:
    model: ModelSpec
    hw: HardwareSpec
    train: TrainSpec
    usable: int


def evaluate_phases(m: ModelSpec, hw: HardwareSpec, t: TrainSpec, groups: tuple[TensorGroup, ...],
                    strategy: Strategy, *, method: Method, optimizer: Optimizer, micro: int, ckpt: GradCkpt,
                    defer: bool, loss: LossMode, act_offload: ActivationOffload, ms=None,
                    parallel: ParallelDims | None = None, tiles: int = 1, ckpt_offload: bool = False):
    """(model-state bytes, {phase: MemoryBreakdown}, peak phase) of one candidate — the one place that
    assembles the phase model's inputs. ``ms``: the model-state bytes when the caller has them already
    (they do not depend on micro batch, checkpointing, loss or activation offload). ``parallel``: the
    candidate's mesh (None: the strategy's 1-D mesh). ``tiles`` / ``ckpt_offload``: the long-context savers
    (compiler/savers.py)."""
    p = parallel or ParallelDims.for_strategy(strategy, hw.world_size, hw.gpus_per_node)
    if ms is None:
        ms = model_state_bytes(m, groups, strategy, hw, method=method, precision=t.precision,
                               optimizer=optimizer, fsdp_defer_grad_sync=defer,
                               grad_accum_steps=t.global_batch_size // (micro * p.dp), parallel=parallel)
    phases, peak = candidate_phases(
        m, groups, strategy, ms, shard_size=shard_group_size(strategy, hw, parallel=parallel), method=method,
        precision=t.precision, optimizer=optimizer, micro_batch=micro, seq_len=t.seq_len, attention=t.attention,
        grad_ckpt=ckpt, selective_every=t.selective_every,
        grad_accum=t.global_batch_size // (micro * p.dp), defer_grad_sync=defer, loss=loss,
        runner=runner_path(t.runner, t.runner_transformers),
        chunk_tokens=t.loss_chunk_tokens, activation_offload=act_offload is not ActivationOffload.NONE,
        cuda_context=CUDA_CONTEXT_BYTES, parallel=parallel, tiled_mlp_tiles=tiles, ckpt_offload=ckpt_offload)
    return ms, phases, peak


_STATES: dict[tuple, tuple[tuple, object]] = {}


def _model_states(model: ModelSpec, groups: tuple[TensorGroup, ...], s: Strategy, hw: HardwareSpec, method: Method,
                  precision: Precision, opt: Optimizer, defer: bool, accum: int, mesh: ParallelDims):
    """model_state_bytes once per (model, inventory, hardware, strategy, mesh, method, precision, optimizer,
    defer, accumulation or not) — across the plans of a `plan --max` too. It reads the accumulation only as
    ``grad_accum_steps > 1`` (memory.py), so the first value seen on each side of 1 stands for the rest."""
    key = (id(model), id(groups), id(hw), s, method, precision, opt, defer, accum > 1, mesh)
    hit = _STATES.get(key)
    if hit is None or hit[0][0] is not model or hit[0][1] is not groups or hit[0][2] is not hw:
        if len(_STATES) > 4096:
            _STATES.clear()
        hit = _STATES[key] = ((model, groups, hw), model_state_bytes(
            model, groups, s, hw, method=method, precision=precision, optimizer=opt, fsdp_defer_grad_sync=defer,
            grad_accum_steps=accum, parallel=mesh))
    return hit[1]


# one count per tensor inventory, not per candidate (the planner evaluates ~2000 per plan)
_trainable = functools.lru_cache(maxsize=16)(trainable_params)


@dataclass(frozen=True)
class _Memory:
    """The memory side of one candidate (what decides whether it fits), before its step time."""
    ms: object
    phases: dict
    peak: str
    loss: LossMode
    act_host: int
    ck_host: int
    ck_off: bool
    cpu: int
    nvme: int
    peak_reserved: int
    why_not: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return not self.why_not


def _memory(ctx: _Ctx, strategy: Strategy, ckpt: GradCkpt, micro: int, optimizer: Optimizer,
            method: Method, defer: bool, groups: tuple[TensorGroup, ...],
            sv: Savers, ms, mesh: ParallelDims) -> _Memory:
    m, hw, t = ctx.model, ctx.hw, ctx.train
    act_offload = sv.activation_offload
    akw = dict(micro_batch=micro, seq_len=t.seq_len, precision=t.precision, attention=t.attention,
               grad_ckpt=ckpt, selective_every=t.selective_every, offload=act_offload)
    reduction = tiled_saved_reduction_per_token(m, t.precision, mesh) if sv.tiles > 1 else 0
    act_host = activation_host_bytes(m, **akw, parallel=mesh, tiled_mlp_saved_reduction=reduction)
    # checkpoint offload: every checkpointed layer's input on the host (fp32 under DDP autocast, as phases.py)
    n_ck = checkpointed_layer_count(ckpt, m.num_layers, t.selective_every)
    ck_off = sv.ckpt_offload and n_ck > 0
    autocast_fp32 = strategy.engine is Engine.DDP and t.precision.autocast and method is Method.FULL
    ck_host = n_ck * ckpt_input_bytes(m, t.precision, tokens_per_rank(micro, t.seq_len, mesh), mesh,
                                      4 if autocast_fp32 else None) if ck_off else 0
    loss = resolve_loss(m, micro_batch=micro, seq_len=t.seq_len, precision=t.precision, loss=t.loss,
                        chunk_tokens=t.loss_chunk_tokens, parallel=mesh)
    # per_gpu = the breakdown at the peak phase (compiler/phases.py), not the sum of each term's maximum
    ms, phases, peak = evaluate_phases(m, hw, t, groups, strategy, method=method, optimizer=optimizer,
                                       micro=micro, ckpt=ckpt, defer=defer, loss=loss, act_offload=act_offload,
                                       ms=ms, parallel=mesh, tiles=sv.tiles, ckpt_offload=ck_off)
    cpu = host_bytes_per_node(m, strategy, hw, ms.cpu_bytes + act_host + ck_host, t.precision, parallel=mesh)
    nvme = ms.nvme_bytes * hw.gpus_per_node
    why = []
    # the fit rule: the caching allocator's reserved peak + what lies outside it (CUDA context, NCCL), i.e.
    # what nvidia-smi would show, against the GPU memory less the user's headroom (compiler/allocator.py)
    # FSDP2's all-gather / reduce-scatter streams keep their own segments (compiler/allocator.py predict)
    side = fsdp_side_stream_pools(m, groups, strategy, shard_size=shard_group_size(strategy, hw, parallel=mesh),
                                  method=method, precision=t.precision, parallel=mesh)
    alloc = predict_allocator(phases, groups, strategy.engine, expandable=hw.expandable_segments, side_pools=side)
    if alloc.nvidia_smi_bytes > ctx.usable:
        why.append(f"needs {fmt_bytes(alloc.nvidia_smi_bytes)} per GPU (reserved + CUDA context) > "
                   f"{fmt_bytes(ctx.usable)} usable")
    if cpu > hw.cpu_memory_bytes:
        why.append(f"needs {fmt_bytes(cpu)} host RAM per node > {fmt_bytes(hw.cpu_memory_bytes)}")
    if nvme > hw.nvme_capacity_bytes:
        why.append(f"needs {fmt_bytes(nvme)} NVMe per node > {fmt_bytes(hw.nvme_capacity_bytes)}")
    return _Memory(ms, phases, peak, loss, act_host, ck_host, ck_off, cpu, nvme, alloc.peak_reserved_bytes,
                   tuple(why))


def _evaluate(ctx: _Ctx, strategy: Strategy, ckpt: GradCkpt, micro: int, optimizer: Optimizer,
              method: Method, defer: bool, groups: tuple[TensorGroup, ...],
              sv: Savers, ms, mesh: ParallelDims) -> Candidate:
    m, hw, t = ctx.model, ctx.hw, ctx.train
    x = _memory(ctx, strategy, ckpt, micro, optimizer, method, defer, groups, sv, ms, mesh)
    accum = t.global_batch_size // (micro * mesh.dp)
    T = _trainable(groups)
    step_s = step_time(m, strategy, hw, method=method, precision=t.precision, micro_batch=micro,
                   grad_accum=accum, seq_len=t.seq_len,
                   ckpt_fraction=recompute_fraction(m, ckpt, t.selective_every, t.seq_len, groups),
                   trainable_params=T, fsdp_defer_grad_sync=defer, chunked_loss=x.loss is LossMode.CHUNKED,
                   activation_offload_bytes=x.act_host + x.ck_host, parallel=mesh, tiled_mlp=sv.tiles > 1)
    return Candidate(strategy=strategy, fits=x.fits, micro_batch_size=micro, grad_accum_steps=accum,
                     gradient_checkpointing=ckpt, optimizer=optimizer, method=method,
                     precision=t.precision, world_size=hw.world_size, per_gpu=x.phases[x.peak],
                     cpu_memory_per_node_bytes=x.cpu, nvme_bytes=x.nvme, step_time_s=step_s,
                     trainable_params=T, fsdp_defer_grad_sync=defer, why_not=x.why_not, loss=x.loss,
                     activation_offload=sv.activation_offload, per_phase=tuple(x.phases.items()),
                     peak_phase=x.peak, peak_reserved_bytes=x.peak_reserved,
                     parallel=mesh, tiled_mlp_tiles=sv.tiles, ckpt_offload=x.ck_off)


_LOSS_PATH: contextvars.ContextVar[LossMode] = contextvars.ContextVar("loss_path", default=LossMode.FULL)
"""loss auto: the loss path the current search pass plans with (_per_loss_path)."""


_ON_PATH: dict[tuple[int, LossMode], tuple[_Ctx, _Ctx]] = {}
"""(id(ctx), path) -> (ctx, ctx planned on that path): one dataclasses.replace per plan, not per candidate."""


def _ctx_on_path(ctx: _Ctx, path: LossMode) -> _Ctx:
    hit = _ON_PATH.get((id(ctx), path))
    if hit is None or hit[0] is not ctx:
        if len(_ON_PATH) > 64:
            _ON_PATH.clear()
        hit = _ON_PATH[(id(ctx), path)] = (ctx, dataclasses.replace(
            ctx, train=dataclasses.replace(ctx.train, loss=path)))
    return hit[1]


def _loss_path(evaluate):
    """loss auto: a candidate is planned with the current pass's loss path (_LOSS_PATH)."""
    @functools.wraps(evaluate)
    def on_path(ctx: _Ctx, *args, **kw) -> Candidate:
        if ctx.train.loss is LossMode.AUTO:
            ctx = _ctx_on_path(ctx, _LOSS_PATH.get())
        return evaluate(ctx, *args, **kw)
    return on_path


_evaluate = _loss_path(_evaluate)
_memory = _loss_path(_memory)


def _runner_refusal(train: TrainSpec) -> str | None:
    """A forced setting the runner cannot run (compiler/runner.py), with the fix."""
    rp = runner_path(train.runner, train.runner_transformers)
    if train.loss is LossMode.CHUNKED and not rp.chunked_loss:
        return (f"train.loss: chunked cannot run under runner {train.runner.value}: it computes the loss inside the "
                "model (HF ForCausalLMLoss); use loss: auto or full, or runner: shardtrain")
    if train.grad_ckpt is GradCkpt.OP and not rp.op_ckpt:
        return (f"train.grad_ckpt: op cannot run under runner {train.runner.value} (it checkpoints whole layers); "
                "use grad_ckpt: auto, full or selective, or runner: shardtrain")
    return None


def micro_batch_options(train: TrainSpec, hw: HardwareSpec, dp: int | None = None) -> list[int]:
    """Micro batches that make global = micro × accumulation × data-parallel size exact. ``dp``: the
    mesh's data-parallel ranks (tp and cp peers share samples); default every rank."""
    dp = hw.world_size if dp is None else dp
    g = train.global_batch_size
    if g % dp:
        lo, hi = (g // dp) * dp, (g // dp + 1) * dp
        near = " or ".join(str(x) for x in (lo, hi) if x > 0)
        raise PlanningError(
            f"train.global_batch: {g} is not a multiple of the {dp} data-parallel ranks "
            f"(global = micro × accumulation × {dp}); use {near}, or change nodes/gpus_per_node, or let tp/cp "
            "ranks share samples (parallel.tp / parallel.cp)")
    per_rank = g // dp
    if train.micro_batch_size is not None:
        if per_rank % train.micro_batch_size:
            divs = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
            raise PlanningError(
                f"train.micro_batch: {train.micro_batch_size} does not divide the {per_rank} samples per rank "
                f"(global_batch {g} / {dp} ranks); use one of {divs} or micro_batch: auto, or set "
                f"global_batch to a multiple of {train.micro_batch_size * dp}")
        return [train.micro_batch_size]
    return [d for d in range(1, min(per_rank, MAX_AUTO_MICRO_BATCH) + 1) if per_rank % d == 0]


def _rank(c: Candidate) -> tuple:
    # ties: fewer tp/cp ranks first (simpler mesh), then the cheaper strategy
    return (c.step_time_s, c.per_gpu.total, c.mesh.tp * c.mesh.cp, STRATEGY_ORDER.index(c.strategy))


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
    ctx = _Ctx(model, hw, train, usable)
    if train.strategy is not None:
        strategies = [train.strategy]
    else:
        strategies = [s for s in STRATEGY_ORDER if s is not Strategy.FSDP_HYBRID_SHARD]
    try:
        refusal = _runner_refusal(train)
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
            ms = _model_states(model, groups, s, hw, method, train.precision, opt, d_ok, accum, mesh)
            if probe:
                x = _memory(ctx, s, ck, mb, opt, method, d_ok, groups, sv, ms, mesh)
                if x.fits:
                    raise _FirstFit((method, opt, s, mesh))
                return _Probed(x.why_not)
            c = _evaluate(ctx, s, ck, mb, opt, method, d_ok, groups, sv, ms, mesh)
            candidates.append(c)
            return c
        # activation offload is a permission and tiled MLP / checkpoint offload auto: each
        # combination is evaluated, the fastest fitting candidate wins (compiler/savers.py)
        shrink = functools.partial(_savers_shrink, model, train, mesh)
        _search_lines(ev, s, mesh, ckpts, micros, saver_options(model, train, mesh), train, shrink)

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
                or [_no_mesh_text(train.parallel, hw)])
        raise PlanningError(f"{forced}: " + "; ".join(msgs))
    fitting = sorted((c for c in candidates if c.fits), key=_rank)
    if not fitting:
        least = min(candidates, key=lambda c: (c.gpu_need_bytes, _rank(c)))
        p = _make_plan(ctx, least, candidates, illegal, targets, asked)
        raise NoFitError(no_fit_summary(least, ctx.usable), p)
    return _make_plan(ctx, fitting[0], candidates, illegal, targets, asked)


def _search_lines(ev, s: Strategy, mesh: ParallelDims, ckpts: list[GradCkpt], micros: list[int],
                  savers: list[Savers], train: TrainSpec, shrink=None) -> None:
    """Evaluate one (strategy, mesh) pair's candidates with pruning that cannot lose the fastest fit:
    memory only grows with the micro batch and shrinks with more checkpointing, and the step time only
    falls with the micro batch (fewer micro-steps, higher MFU: compiler/cost.py). So: the most-saving
    checkpointing at the smallest micro batch first — if that does not fit, nothing on this pair does;
    otherwise per line (checkpointing, defer) the largest micro batch that fits (the largest first, then
    bisection).

    Saver combinations (compiler/savers.py; ``savers[0]`` uses none): a saver only adds step time (PCIe
    copies, recomputed MLP forwards), so a combination can win only above the largest micro batch at which
    a combination with a subset of its savers fit (``Savers`` order: savers.dominates). Where ``shrink(ckpt,
    micro, savers)`` says each saver only lowers the device bytes (savers.savers_only_shrink), a
    combination also cannot fit where one with a superset of its savers missed on GPU memory alone — so
    the most-saving combinations are searched right after the plain one, and the others only in between.
    A point already no faster than the pair's best fit without savers is not tried with them (the loss
    path may differ between the two: chunked costs 2·h·V FLOPs per token, small next to a saver's cost);
    once the pair's fastest point fits, nothing else is tried. Checkpoint offload is not tried without
    checkpointed layers (it would change nothing).
    ``ev(ckpt, micro, defer, savers)`` evaluates a candidate and records it."""
    lo = micros[0]
    fitted: dict[Savers, dict[tuple[GradCkpt, bool], int]] = {}    # largest micro batch that fit, per line
    gpu_miss: dict[Savers, dict[tuple[GradCkpt, bool], int]] = {}  # smallest that missed on GPU memory alone
    plain: dict[tuple[GradCkpt, int, bool], float] = {}            # step times without savers
    best = float("inf")
    order = _saver_order(savers)
    done: list[Savers] = []

    def point(sv: Savers, ck: GradCkpt, mb: int, d_ok: bool) -> bool:
        nonlocal best
        c = ev(ck, mb, d_ok, sv)
        if sv == savers[0]:
            plain[(ck, mb, d_ok)] = c.step_time_s
        line = (ck, d_ok)
        if c.fits:
            fitted[sv][line] = max(fitted[sv].get(line, 0), mb)
            best = min(best, c.step_time_s)
        elif all("per GPU" in w for w in c.why_not) and (shrink is None or shrink(ck, mb, sv)):
            gpu_miss[sv][line] = min(gpu_miss[sv].get(line, 10**12), mb)
        return c.fits

    for sv in order:
        fitted[sv], gpu_miss[sv] = {}, {}
        cks = [c for c in ckpts if not (sv.ckpt_offload and c is GradCkpt.NONE)]
        below = [o for o in done if dominates(o, sv)]     # fewer savers: faster at the same point
        above = [o for o in done if dominates(sv, o)]     # more savers: less memory where shrink holds
        done.append(sv)
        if not cks:
            continue

        def lower(line, below=below):
            return max([fitted[o].get(line, 0) for o in below], default=0)

        def upper(line, above=above):
            return min([gpu_miss[o].get(line, 10**12) for o in above], default=10**12)

        floor_line = (cks[-1], False)
        if not lower(floor_line) >= lo:   # else the floor fit with fewer savers: something fits
            if upper(floor_line) <= lo or not point(sv, cks[-1], lo, False):
                continue
        for ck in cks:
            for d_ok in (False, True):
                line = (ck, d_ok)
                # the micro batches that can still win on this line: above a fit with fewer savers, below a
                # GPU miss with more, with accumulation for a deferred sync (FSDP_OFFLOAD: a deferred sync
                # would keep unsharded fp32 grads on the GPU, the very memory the offload frees), and not
                # already no faster than the pair's best fit without savers
                opts = [mb for mb in micros if lower(line) < mb < upper(line) and mb > fitted[sv].get(line, 0)
                        and (not d_ok or (s.engine is Engine.FSDP and s is not Strategy.FSDP_OFFLOAD
                                          and train.global_batch_size // (mb * mesh.dp) > 1))
                        and plain.get((ck, mb, d_ok), 0.0) < best]
                _largest_fit(lambda mb, ck=ck, d_ok=d_ok, sv=sv: point(sv, ck, mb, d_ok), opts)
        if fitted[savers[0]].get((ckpts[0], False), 0) == micros[-1]:
            break   # the pair's fastest point fits without savers: no combination can beat it


def _saver_order(savers: list[Savers]) -> list[Savers]:
    """The plain combination, then the most-saving ones (no other has more savers), then the rest."""
    rest = savers[1:]
    top = [sv for sv in rest if not any(o != sv and dominates(sv, o) for o in rest)]
    return savers[:1] + top + [sv for sv in rest if sv not in top]


def _savers_shrink(model: ModelSpec, train: TrainSpec, mesh: ParallelDims, ck: GradCkpt, micro: int,
                   sv: Savers) -> bool:
    n_ck = checkpointed_layer_count(ck, model.num_layers, train.selective_every) if sv.ckpt_offload else 2
    return savers_only_shrink(model, train.precision, tokens_per_rank(micro, train.seq_len, mesh), sv.tiles, n_ck,
                              mesh)


def _largest_fit(fits, options: list[int]) -> None:
    """Evaluate ``fits`` on ascending ``options`` until the largest that fits is known: the largest first
    (it fits in the common case), then bisection (memory only grows with the micro batch)."""
    if not options or fits(options[-1]):
        return
    lo, hi = -1, len(options) - 1   # options[hi] does not fit; options[lo] fits (-1: none known)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(options[mid]):
            lo = mid
        else:
            hi = mid


def _per_loss_path(search):
    """loss auto (the default): each (strategy, mesh) pair is searched with the full loss path, then, when
    the runner has it (compiler/runner.py) and the full path does not fit at the pair's fastest point, with
    the chunked one (at the same point chunked only adds work: compiler/cost.py). Every candidate of both
    passes competes, so chunked is chosen exactly when it lets a faster plan fit or the full path does not
    fit (compiler/loss_choice.py says which)."""
    @functools.wraps(search)
    def both(ev, s, mesh, ckpts, micros, savers, train, *rest):
        if train.loss is not LossMode.AUTO:
            return search(ev, s, mesh, ckpts, micros, savers, train, *rest)
        full: dict[tuple, Candidate] = {}

        def ev_full(*point):
            full[point] = c = ev(*point)
            return c

        def ev_chunked(*point):
            # where the full path fits, the chunked one is slower (and so is every smaller micro batch on
            # the line): the full candidate stands in, which ends the line without a new evaluation
            known = full.get(point)
            return known if known is not None and known.fits else ev(*point)

        token = _LOSS_PATH.set(LossMode.FULL)
        try:
            search(ev_full, s, mesh, ckpts, micros, savers, train, *rest)
            top = full.get((ckpts[0], micros[-1], False, savers[0]))
            if not runner_path(train.runner, train.runner_transformers).chunked_loss or (top and top.fits):
                return None
            _LOSS_PATH.set(LossMode.CHUNKED)
            # the pair's fastest point bounds every chunked candidate on it (less checkpointing and larger
            # micro batches only speed up): no chunked pass when that bound is no faster than a full fit
            best_full = min((c.step_time_s for c in full.values() if c.fits), default=float("inf"))
            if ev_chunked(ckpts[0], micros[-1], False, savers[0]).step_time_s >= best_full:
                return None
            return search(ev_chunked, s, mesh, ckpts, micros, savers, train, *rest)
        finally:
            _LOSS_PATH.reset(token)
    return both


_search_lines = _per_loss_path(_search_lines)


def _no_mesh_text(req: ParallelRequest, hw: HardwareSpec) -> str:
    forced = {k: v for k, v in req.to_json().items() if isinstance(v, int)}
    prod = 1
    for v in forced.values():
        prod *= v
    if hw.world_size % prod:
        dims = " × ".join(f"{k} {v}" for k, v in forced.items())
        return (f"parallel: {dims} does not divide the {hw.world_size} GPUs (nodes × gpus_per_node): "
                "choose dims whose product divides it, or leave them auto")
    return (f"no mesh of {hw.world_size} ranks matches parallel: {_req_text(req)} (cp must divide train.seq_len "
            "and, with auto dims, tp ≤ 8 dividing the heads, cp ≤ 32): leave a dim auto or change it")


def _req_text(req: ParallelRequest) -> str:
    return ", ".join(f"{k} {v.value if hasattr(v, 'value') else v}" for k, v in req.to_json().items()
                     if v is not None) or "auto"


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
        better = (c.fits, -_rank(c)[0]) > (cur.fits, -_rank(cur)[0]) if cur else True
        if not c.fits and cur is not None and not cur.fits:
            better = short(c) < short(cur)
        if better:
            best[c.strategy] = c
    return best


def _make_plan(ctx: _Ctx, chosen: Candidate, candidates: list[Candidate], illegal: dict[Strategy, str],
               targets: tuple[str, ...], asked: TrainSpec) -> Plan:
    best = _best_per_strategy(candidates, ctx.usable)
    others = [c for s, c in best.items() if s is not chosen.strategy]
    others.sort(key=lambda c: (not c.fits, _rank(c)))
    loss_why = (loss_auto_reason(chosen, candidates, ctx.train.runner)
                if ctx.train.loss is LossMode.AUTO else "")
    reasons = plan_reasons(ctx.model, ctx.train, ctx.hw, ctx.usable, chosen, best, illegal, loss_why=loss_why)
    reasons[1:1] = mesh_reasons(ctx.train, asked, ctx.hw, chosen, candidates)
    return Plan(chosen=chosen, alternatives=tuple(others), model=ctx.model, hardware=ctx.hw, train=asked,
                gpu_memory_bytes=ctx.hw.gpu_memory_bytes,
                headroom_bytes=ctx.hw.gpu_memory_bytes - ctx.usable, reasons=tuple(reasons),
                lora_targets=targets)
