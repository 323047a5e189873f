"""One candidate's evaluation (pure): the phase model's inputs assembled in one place (``evaluate_phases``),
its model-state bytes once per pair (``model_states``), its memory and the fit rule (``candidate_memory``:
the allocator's reserved peak + CUDA context against the usable GPU memory, host RAM, NVMe) and, for a full
candidate, its step time (``evaluate_candidate``). Under ``loss: auto`` both evaluate on the loss path of the
current search pass (``LOSS_PATH``, set by compiler/search_lines.py). Split out of compiler/planner.py, which
re-exports ``evaluate_phases``."""
from __future__ import annotations

import contextvars
import dataclasses
import functools
from dataclasses import dataclass

from shardtrain.compiler.allocator import predict as predict_allocator
from shardtrain.compiler.activations import (activation_host_bytes, checkpointed_layer_count, resolve_loss,
                                             tokens_per_rank)
from shardtrain.compiler.cost import step_time
from shardtrain.compiler.inventory import TensorGroup, trainable_params
from shardtrain.compiler.memo import by_identity
from shardtrain.compiler.memory import CUDA_CONTEXT_BYTES, host_bytes_per_node, model_state_bytes, shard_group_size
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.op_ckpt import recompute_fraction
from shardtrain.compiler.phases import candidate_phases, fsdp_side_stream_pools, residual_elem_bytes
from shardtrain.compiler.plan import Candidate
from shardtrain.compiler.runner import runner_path
from shardtrain.compiler.savers import Savers, ckpt_input_bytes
from shardtrain.compiler.specs import (ActivationOffload, GradCkpt, HardwareSpec, LossMode, Method,
                                       Optimizer, ParallelDims, Precision, Strategy, TrainSpec)
from shardtrain.units import fmt_bytes


@dataclass(frozen=True)
class PlanCtx:
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


def model_states(model: ModelSpec, groups: tuple[TensorGroup, ...], s: Strategy, hw: HardwareSpec, method: Method,
                 precision: Precision, opt: Optimizer, defer: bool, accum: int, mesh: ParallelDims):
    """model_state_bytes once per (model, inventory, hardware, strategy, mesh, method, precision, optimizer,
    defer, accumulation or not) — across the plans of a `plan --max` too. It reads the accumulation only as
    ``grad_accum_steps > 1`` (memory.py), so 2 stands for every accumulation."""
    return _model_states(model, groups, s, hw, method, precision, opt, defer, accum > 1, mesh)


@by_identity(0, 1, 3)
def _model_states(model: ModelSpec, groups: tuple[TensorGroup, ...], s: Strategy, hw: HardwareSpec, method: Method,
                  precision: Precision, opt: Optimizer, defer: bool, accumulating: bool, mesh: ParallelDims):
    return model_state_bytes(model, groups, s, hw, method=method, precision=precision, optimizer=opt,
                             fsdp_defer_grad_sync=defer, grad_accum_steps=2 if accumulating else 1, parallel=mesh)


@dataclass(frozen=True)
class CandidateMemory:
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


def candidate_memory(ctx: PlanCtx, strategy: Strategy, ckpt: GradCkpt, micro: int, optimizer: Optimizer,
                     method: Method, defer: bool, groups: tuple[TensorGroup, ...],
                     sv: Savers, ms, mesh: ParallelDims) -> CandidateMemory:
    m, hw, t = ctx.model, ctx.hw, ctx.train
    act_offload = sv.activation_offload
    akw = dict(micro_batch=micro, seq_len=t.seq_len, precision=t.precision, attention=t.attention,
               grad_ckpt=ckpt, selective_every=t.selective_every, offload=act_offload)
    act_host = activation_host_bytes(m, **akw, parallel=mesh, tiled_mlp=sv.tiles > 1)
    # checkpoint offload: every checkpointed layer's input on the host (fp32 under DDP autocast, as phases.py)
    n_ck = checkpointed_layer_count(ckpt, m.num_layers, t.selective_every)
    ck_off = sv.ckpt_offload and n_ck > 0
    ck_host = n_ck * ckpt_input_bytes(m, t.precision, tokens_per_rank(micro, t.seq_len, mesh), mesh,
                                      residual_elem_bytes(strategy.engine, t.precision, method)) if ck_off else 0
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
    return CandidateMemory(ms, phases, peak, loss, act_host, ck_host, ck_off, cpu, nvme, alloc.peak_reserved_bytes,
                   tuple(why))


def evaluate_candidate(ctx: PlanCtx, strategy: Strategy, ckpt: GradCkpt, micro: int, optimizer: Optimizer,
                       method: Method, defer: bool, groups: tuple[TensorGroup, ...],
                       sv: Savers, ms, mesh: ParallelDims) -> Candidate:
    m, hw, t = ctx.model, ctx.hw, ctx.train
    x = candidate_memory(ctx, strategy, ckpt, micro, optimizer, method, defer, groups, sv, ms, mesh)
    accum = t.global_batch_size // (micro * mesh.dp)
    T = trainable_params(groups)   # memoised per inventory (memo.by_identity)
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


LOSS_PATH: contextvars.ContextVar[LossMode] = contextvars.ContextVar("loss_path", default=LossMode.FULL)
"""loss auto: the loss path the current search pass plans with (_per_loss_path)."""


@by_identity   # (ctx, path): one dataclasses.replace per plan, not per candidate
def _ctx_on_path(ctx: PlanCtx, path: LossMode) -> PlanCtx:
    return dataclasses.replace(ctx, train=dataclasses.replace(ctx.train, loss=path))


def _loss_path(evaluate):
    """loss auto: a candidate is planned with the current pass's loss path (LOSS_PATH)."""
    @functools.wraps(evaluate)
    def on_path(ctx: PlanCtx, *args, **kw) -> Candidate:
        if ctx.train.loss is LossMode.AUTO:
            ctx = _ctx_on_path(ctx, LOSS_PATH.get())
        return evaluate(ctx, *args, **kw)
    return on_path


evaluate_candidate = _loss_path(evaluate_candidate)
candidate_memory = _loss_path(candidate_memory)
