"""Per-GPU model-state memory (params, grads, master params, optimizer states, comm buffers) for
every strategy, plus host RAM and NVMe per node — modelled on what the engines really allocate.

Baseline (ZeRO paper, Rajbhandari et al. 2020, K=12): mixed-precision Adam costs 2+2+12 = 16 B/param;
ZeRO-1 4Ψ + 12Ψ/N, ZeRO-2 2Ψ + 14Ψ/N, ZeRO-3 16Ψ/N. The engines differ in the split, and the runtime
(shardtrain.runtime) follows the same dtype policy that is modelled here:
- DDP / FSDP2 (torch): trainable params stay fp32 and compute runs under autocast (DDP) or the
  MixedPrecisionPolicy (FSDP2, param_dtype=16-bit, reduce_dtype=fp32): params 4, grads 4, no master
  copy, states K-4 = 8 — the same 16 B/param, split differently. Frozen (LoRA base) weights are stored
  in the compute dtype; QLoRA base Linear weights in NF4. Pure bf16 (Precision.BF16_PURE, torchtune's
  `dtype: bf16`): params 2, grads 2, AdamW states 4 (torch allocates them like the param) = 8 B/param.
- DeepSpeed ZeRO (0.19.8 stage_1_and_2.py, stage3.py; p = 2 for bf16/fp16, 4 for fp32, P = this
  rank's partition of the T trainable elements). Every term was matched against the real engine on 2
  gloo ranks (tests/test_truth_engines.py):
  * params: the module is cast to 16-bit (p·T + frozen, stage 1/2); stage 3 keeps the `ds_tensor`
    partitions plus a full copy of every *persistent* parameter (numel <= param persistence
    threshold, see zero3_persistent_bytes).
  * master_params: an fp32 clone of the partition, 4P, in every precision (fp32 too:
    `single_partition_of_fp32_groups = ...clone().to(fp32)`; stage3 `fp32_partitioned_groups_flat`).
  * grads = 16-bit gradient partition + the larger of two phases that never overlap:
    - step: the fp32 gradient partition `flatten(averaged_gradients).to(fp32)` (4P; with fp32 the
      flatten() is the copy), alive together with the 16-bit partition;
    - backward: gradients outside the buckets. A gradient autograd has just produced exists in full
      until the hook copies it into a bucket (p·largest tensor, "in flight"); tensors larger than
      reduce_bucket_size are reduced from their own storage; ZeRO-1 keeps those of *other* ranks'
      partitions until the backward epilogue (stage 2 frees them after each reduction).
    With gradient accumulation, stage 1 reduces nothing off the boundary, so every rank holds every
    param.grad in full (p·T) between micro-steps (zero_layout._zero1_accum_held).
    The stage-1/2 16-bit partition buffer `grads_in_partition` is sized by the *whole* tensors that
    overlap the rank's slice of the flat buffer (get_partition_info / copy_grads_in_partition), so the
    worst rank can hold much more than T/N (a 128k-vocab embedding straddling many small slices):
    compiler/zero_layout.py simulates the flat layout in module order. Stage 3 partitions
    every tensor, so its `grad_partitions_flat_buffer` is exactly P.
  * optimizer offload (DeepSpeedCPUAdam): master, states and the fp32 gradient partition live on the
    host, plus a 16-bit staging copy of the partition (stage 1/2 `param_buffer_of_bit16_for_cpu_offload
    _groups`; stage 3 `grad_partitions_flat_buffer`, allocated on `self.device` = cpu) and, stage 1/2,
    `temp_grad_buffer_for_cpu_offload` (p·largest) whose device twin is a buffer. The device keeps
    only the in-flight gradient. Param offload moves the partitions to the host; persistent params
    stay on the device.
  The fp32 gradient partition exists only inside optimizer.step(), when activations are freed, so a
  peak that adds grads to activations is conservative by up to 4P.
On a device mesh (compiler/mesh_memory.py): every term is over the tensors one tp rank holds
(transformers 5.23 Llama tp plan: colwise q/k/v/gate/up, rowwise o/down, lm_head on the vocab, embedding
and norms whole), sharded over dp_shard × cp (FSDP2; HSDP replicates over dp_replicate) or over every
data × sequence rank (DeepSpeed). `parallel=None` is the strategy's 1-D mesh.
QLoRA (Dettmers et al. 2023): NF4 4 bits + fp32 absmax per 64 (0.5 bit) or double-quantised 8-bit
absmax per 64 + fp32 per 256 blocks (0.127 bit) -> 4.127 bits = 0.516 B/param, plus a small
per-tensor QuantState (QLORA_QUANT_STATE_BYTES_PER_TENSOR).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from shardtrain.compiler.inventory import TensorGroup, trainable_params
from shardtrain.compiler.mesh_memory import (mesh_of, mesh_shard_size, tp_largest_unit_params, tp_local_groups,
                                             tp_num_params)
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.optimizer_states import state_bytes
from shardtrain.compiler.specs import (Engine, HardwareSpec, Method, OffloadDevice, Optimizer, ParallelDims, Precision,
                                       Strategy)
from shardtrain.compiler.zero_buckets import MIN_BUCKET_ELEMENTS, ZeroBuckets  # noqa: F401 (re-exported)
from shardtrain.compiler.zero_layout import (Zero12Partition, flat_order_numels,  # noqa: F401 (re-exported)
                                             zero2_offload_accum_grads, zero12_partitions)
from shardtrain.units import GiB, MiB

CUDA_CONTEXT_BYTES = 768 * MiB
"""CUDA context + cuBLAS/cuDNN workspaces + NCCL communicator buffers per GPU (calibratable:
~500 MiB context on H100 with torch 2.x, plus NCCL channels)."""
HOST_BYTES_PER_RANK = 3 * GiB
"""Host RSS of one training process before model states (Python, torch, CUDA host runtime)."""
QLORA_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""NF4 + double quantisation: 0.5 B + 8-bit absmax per 64 + fp32 absmax per 256 blocks."""
QLORA_QUANT_STATE_BYTES_PER_TENSOR = 16 * 4 + 4 + 256 * 4
"""Per quantized tensor, bitsandbytes 0.50.2 functional.quantize_4bit keeps a QuantState with its own
`code` (16 fp32 NF4 levels) and, with double quantisation, `offset` (fp32 scalar) and a nested
state2 whose `code` is a 256-entry fp32 map (quantize_blockwise) — 1092 B per tensor, checked
against a real 4-bit load in tests/test_memory_model.py (negligible beyond toy models)."""
INFINITY_SWAP_BUFFERS = 5
"""DeepSpeed offload_{param,optimizer}.buffer_count default for NVMe swapping."""


@dataclass(frozen=True)
class ModelStateBytes:
    """Per-rank model-state bytes on the GPU, and what lives on host / NVMe per rank."""
    params: int
    grads: int
    master_params: int
    optimizer_states: int
    buffers: int
    cpu_bytes: int = 0
    nvme_bytes: int = 0


def frozen_weight_bytes(groups: tuple[TensorGroup, ...], method: Method, precision: Precision) -> int:
    """Bytes of the frozen base model (LoRA: compute dtype; QLoRA: NF4 Linear weights)."""
    total = 0
    for g in groups:
        if g.trainable:
            continue
        if method is Method.QLORA and g.quantizable:
            total += math.ceil(g.total * QLORA_BYTES_PER_PARAM) + g.count * QLORA_QUANT_STATE_BYTES_PER_TENSOR
        else:
            total += g.total * (2 if method is Method.QLORA else precision.param_bytes)
    return total


def qlora_stats_bytes(groups: tuple[TensorGroup, ...], method: Method) -> int:
    """QLoRA: the part of frozen_weight_bytes that is not the packed NF4 storage (absmax, double-quantised,
    and the per-tensor QuantState). bitsandbytes 0.50 keeps it in the QuantState, which Params4bit(module=...)
    also puts on the Linear4bit module (nn/modules.py `self.module.quant_state = ...`; forward reads it back:
    fix_4bit_weight_quant_state_from_module) — not a parameter, so FSDP2 neither shards nor offloads it: every
    rank holds all of it on its device (measured: tests/runtime/test_state_bytes_vs_plan.py qlora_fsdp_offload)."""
    if method is not Method.QLORA:
        return 0
    return sum(math.ceil(g.total * QLORA_BYTES_PER_PARAM) - math.ceil(g.total * 0.5) +
               g.count * QLORA_QUANT_STATE_BYTES_PER_TENSOR for g in groups if not g.trainable and g.quantizable)


def shard_group_size(strategy: Strategy, hw: HardwareSpec, *, parallel: ParallelDims | None = None) -> int:
    """Ranks that share one copy of the sharded state (HYBRID shards inside a node only); on a mesh,
    dp_shard × cp (ParallelDims.fsdp_shard; DDP: 1). None: the strategy's 1-D mesh."""
    if parallel is not None:
        return mesh_shard_size(strategy, mesh_of(strategy, hw, parallel))
    if strategy is Strategy.DDP:
        return 1
    if strategy is Strategy.FSDP_HYBRID_SHARD:
        return hw.gpus_per_node
    return hw.world_size


@functools.lru_cache(maxsize=256)
def fsdp_shard_groups(groups: tuple[TensorGroup, ...], n: int) -> tuple[TensorGroup, ...]:
    """The tensor groups as one FSDP2 rank stores them: dim 0 padded to a multiple of n, then split
    (cached: the phase model asks for it once per candidate)."""
    if n == 1:
        return groups
    return tuple(replace(g, shape=(math.ceil(g.shape[0] / n),) + g.shape[1:]) for g in groups)


def zero3_persistent_bytes(groups: tuple[TensorGroup, ...], buckets: ZeroBuckets, method: Method,
                           precision: Precision) -> int:
    """Bytes of the full (gathered) copies of ZeRO-3's persistent parameters, in their own dtype.

    DeepSpeed parameter_offload.py mark_persistent_parameters() marks every parameter (trainable or
    frozen) with `ds_numel <= stage3_param_persistence_threshold` as `ds_persist`; after the first
    forward it stays gathered on every rank (its partition `ds_tensor` is kept too)."""
    total = 0
    for g in groups:
        if g.numel > buckets.param_persistence_threshold:
            continue
        if g.trainable:
            total += g.total * precision.param_bytes
        else:
            total += frozen_weight_bytes((g,), method, precision)
    return total


def _zero3_partition(groups: tuple[TensorGroup, ...], n: int, trainable: bool) -> int:
    """Stage 3 partitions every tensor separately: ds_tensor holds ceil(numel / N) elements."""
    return sum(g.count * math.ceil(g.numel / n) for g in groups if g.trainable is trainable)


def largest_unit_params(model: ModelSpec, tp: int = 1) -> int:
    """Largest FSDP unit / ZeRO-3 gathered module: one decoder layer, or the embedding/lm_head (on one
    tp rank: mesh_memory.tp_largest_unit_params)."""
    if tp > 1:
        return tp_largest_unit_params(model, tp)
    return max(model.per_layer_params, model.embedding_params, model.lm_head_params)


def gathered_bytes_per_param(groups: tuple[TensorGroup, ...], method: Method,
                              precision: Precision) -> tuple[float, float]:
    """Average bytes per parameter of gathered (unsharded) weights, and the trainable fraction.

    Full / LoRA gather 16-bit weights; QLoRA gathers the NF4 storage (bnb_4bit_quant_storage makes
    the packed bytes shardable but does not change their size), so gathered units are ~4x smaller.
    """
    total = sum(g.total for g in groups)
    trainable = trainable_params(groups)
    gathered = precision.param_bytes * trainable + frozen_weight_bytes(groups, method, precision)
    return gathered / total, trainable / total


def zero3_window_bytes(model: ModelSpec, groups: tuple[TensorGroup, ...], method: Method,
                       precision: Precision, buckets: ZeroBuckets, *, tp: int = 1) -> int:
    """ZeRO-3's gathered-parameter window: the largest module plus the prefetch bucket, capped at
    stage3_max_live_parameters (partitioned_param_coordinator.py fetch_sub_module / prefetch)."""
    bpp, _ = gathered_bytes_per_param(groups, method, precision)
    return int(min(buckets.max_live_parameters, largest_unit_params(model, tp) + buckets.prefetch_bucket_elements) * bpp)


def model_state_bytes(model: ModelSpec, groups: tuple[TensorGroup, ...], strategy: Strategy,
                      hw: HardwareSpec, *, method: Method, precision: Precision, optimizer: Optimizer,
                      fsdp_defer_grad_sync: bool = False, grad_accum_steps: int = 1,
                      parallel: ParallelDims | None = None) -> ModelStateBytes:
    """Model-state bytes per rank for one strategy (see module docstring for the dtype policy).
    `grad_accum_steps` > 1 adds what ZeRO-2 + optimizer offload holds between micro-steps
    (zero2_offload_accum_grads). `parallel`: the device mesh (None: the strategy's 1-D mesh, numbers
    as before the mesh existed); the state is sharded over its dp_shard × cp ranks."""
    N = shard_group_size(strategy, hw, parallel=parallel)
    tp = parallel.tp if parallel is not None else 1
    # the emitted buckets are sized by the whole model's trainable count (plan.zero_buckets)
    buckets = ZeroBuckets.for_model(model, trainable_params(groups), offload=strategy.offloads)
    # tp: every term below is over the tensors one tp rank holds (mesh_memory.tp_local_groups: colwise
    # linears split on out, rowwise on in, embedding and norms whole), then sharded over dp_shard × cp
    groups = tp_local_groups(groups, tp)
    unit = largest_unit_params(model, tp)
    T = trainable_params(groups)
    frozen = frozen_weight_bytes(groups, method, precision)
    p = precision.param_bytes
    # DDP / FSDP2 trainable params, grads and torch optimizer states: fp32, or bf16 in pure bf16
    tb = precision.trainable_bytes
    engine = strategy.engine

    if engine is Engine.DDP:
        # no bucket memory: the runtime sets gradient_as_bucket_view=True, so the grads ARE the 25 MiB
        # buckets (reducer.cpp initialize_bucket_views) and the default comm hook all-reduces them in
        # place (_AllReduceBySumCommHook; ProcessGroupNCCL allreduce is in place, then `div_`): nothing
        # beyond the 4·T grads term (measured: real MemTracker, 2 gloo ranks, Buffer/Other = 256 B)
        states = state_bytes(optimizer, groups, elem_bytes=tb)
        return ModelStateBytes(params=tb * T + frozen, grads=tb * T, master_params=0,
                               optimizer_states=states, buffers=0)

    if engine is Engine.FSDP:
        states = state_bytes(optimizer, groups, shard=N, elem_bytes=tb)
        # FSDP2 shards every parameter on dim 0, padding it to a multiple of N
        # (_fully_shard/_fsdp_param.py _init_sharded_param: padded chunk of ceil(dim0 / N) rows)
        shards = fsdp_shard_groups(groups, N)
        T_shard = trainable_params(shards)
        # QLoRA: only the packed NF4 storage is a parameter FSDP2 shards; the quantisation statistics stay
        # whole on every rank's device (qlora_stats_bytes)
        stats = qlora_stats_bytes(groups, method)
        sharded_params = tb * T_shard + frozen_weight_bytes(shards, method, precision) - qlora_stats_bytes(shards, method)
        grads = tb * T_shard
        bpp, trainable_frac = gathered_bytes_per_param(groups, method, precision)
        # all-gather of the current + prefetched unit in param_dtype (QLoRA: the 4-bit storage), and
        # the unsharded 16-bit grads of the unit's trainable params plus their fp32 reduce-scatter
        # copy (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py); pure bf16 reduce-scatters
        # in the params' own dtype (no MixedPrecisionPolicy: reduce_dtype None), a bf16 copy.
        buffers = int(2 * unit * bpp + unit * trainable_frac * (p + tb))
        if strategy is Strategy.FSDP_SHARD_GRAD_OP:
            # reshard_after_forward=False keeps every unit's unsharded params from forward to backward
            buffers += int((tp_num_params(model, tp) - unit) * bpp)
        if strategy is Strategy.FSDP_OFFLOAD:
            return replace(_fsdp_offload_bytes(sharded_params, grads, states, buffers, unit, bpp, trainable_frac, N, p,
                                               tb * T if fsdp_defer_grad_sync else 0, tb), params=stats)
        sharded_params += stats
        if fsdp_defer_grad_sync:
            # set_requires_gradient_sync(False) accumulates unsharded fp32 (pure: bf16) grads across micro-steps
            grads += tb * T
        return ModelStateBytes(params=sharded_params, grads=grads, master_params=0,
                               optimizer_states=states, buffers=buffers)

    # DeepSpeed ZeRO (see the module docstring; 0.19.8 stage_1_and_2.py / stage3.py)
    stage = strategy.zero_stage
    off_opt, off_par = strategy.offload_optimizer, strategy.offload_params
    trainable_numels = [g.numel for g in groups if g.trainable]
    largest = max(trainable_numels, default=0)   # gradient in flight during backward
    states = state_bytes(optimizer, groups, shard=N, flat_partitions=True)
    host_grads = 0       # gradient bytes the engine keeps on the host (optimizer offload)
    host_staging = 0     # 16-bit copies DeepSpeedCPUAdam's path keeps on the host
    persistent = 0       # ZeRO-3 persistent params (full copies on every rank)
    if stage in (1, 2):
        parts = zero12_partitions(flat_order_numels(model, groups), N, buckets.reduce_bucket_elements)
        P = parts[0].partition if parts else 0
        params = p * T + frozen
        # overlap_comm double-buffers the reduce bucket (setup_buckets: ipg buffer x2, 16-bit); the
        # updated 16-bit partitions are all-gathered in place into the flat buffer (no extra bucket)
        buffers = 2 * buckets.reduce_bucket_elements * p
        if off_opt is OffloadDevice.NONE:
            def rank_grads(r: Zero12Partition) -> int:
                backward = r.held_large if stage == 1 else largest
                if stage == 2 and grad_accum_steps > 1:
                    # off the boundary the epilogue keeps this micro-step's gradients in
                    # `all_grad_tensors` (views of grads_in_partition, which _release_ipg_buffers only
                    # un-names) and the next backward allocates a new grads_in_partition: two extents,
                    # plus the in-flight gradient once a reduction ran mid-backward (T > bucket).
                    # Measured: 2 gloo ranks, accumulation 2, 65k-vocab tiny Llama with a 6.5M bucket:
                    # 2 x 34.2 MB + the 33.6 MB embedding gradient (tests/runtime/test_zero2_large_grad.py)
                    backward = r.grad_buffer + (largest if T > buckets.reduce_bucket_elements else 0)
                step = p * r.grad_buffer + max(4 * P, p * backward)
                if stage == 1 and grad_accum_steps > 1:
                    # stage 1 reduces only at the accumulation boundary (engine.allreduce_gradients;
                    # reduce_ready_partitions_and_remove_grads), so every param.grad is held in full
                    # between micro-steps, p·T on every rank (zero_layout._zero1_accum_held). Measured:
                    # 4 gloo ranks, accumulation 2: the old formula was -44% (fp32) / -19% (bf16)
                    # (tests/runtime/test_zero1_accum_world4.py)
                    return max(step, p * r.held_zero1_accum)
                return step
            grads = max((rank_grads(r) for r in parts), default=0)
        else:
            # grads go bucket -> fp32 host partition (async_inplace_copy_grad_to_fp32_buffer_from_gpu);
            # the device only holds the in-flight gradient and temp_grad_buffer_for_gpu_offload
            grads = p * largest
            buffers += p * largest
            host_grads = 4 * P
            host_staging = p * P + p * largest   # param_buffer_of_bit16..., temp_grad_buffer_for_cpu_offload
            if stage == 2 and grad_accum_steps > 1:
                dev, host = zero2_offload_accum_grads(parts, p)
                grads, host_grads = dev, host_grads + host
    else:
        P = _zero3_partition(groups, N, trainable=True)
        frozen_groups = tuple(replace(g, shape=(math.ceil(g.numel / N),)) for g in groups if not g.trainable)
        # QLoRA: the quantisation statistics are no parameter, whole on every rank (qlora_stats_bytes)
        frozen_part = (frozen_weight_bytes(frozen_groups, method, precision) - qlora_stats_bytes(frozen_groups, method)
                       + qlora_stats_bytes(groups, method))
        persistent = zero3_persistent_bytes(groups, buckets, method, precision)
        params = p * P + frozen_part + persistent
        # stage3.py keeps ONE reduce bucket per dtype (ipg_buckets[dtype].buffer, contiguous_gradients)
        buffers = zero3_window_bytes(model, groups, method, precision, buckets, tp=tp) + buckets.reduce_bucket_elements * p
        if off_opt is OffloadDevice.NONE:
            grads = p * P + max(4 * P, p * largest)
        else:
            grads = p * largest
            host_grads = p * P + 4 * P   # grad_partitions_flat_buffer on self.device (cpu) + fp32 grads
    master = 4 * P
    cpu = nvme = 0
    if off_opt is not OffloadDevice.NONE:
        if off_opt is OffloadDevice.CPU:
            cpu += master + states + host_grads + host_staging
        else:  # NVMe: master + states swapped through pinned buffers; gradients stay on the host
            nvme += master + states
            cpu += host_grads + host_staging + 2 * INFINITY_SWAP_BUFFERS * buckets.reduce_bucket_elements * 4
        master = states = 0
    if off_par is not OffloadDevice.NONE:
        partitions = params - persistent   # persistent params stay gathered on the device
        if off_par is OffloadDevice.CPU:
            cpu += partitions
        else:
            nvme += partitions
            cpu += INFINITY_SWAP_BUFFERS * unit * p
        params = persistent
    return ModelStateBytes(params=params, grads=grads, master_params=master, optimizer_states=states,
                           buffers=buffers, cpu_bytes=cpu, nvme_bytes=nvme)


def _fsdp_offload_bytes(sharded_params: int, sharded_grads: int, states: int, buffers: int, unit: int,
                        bpp: float, trainable_frac: float, n: int, p: int, deferred_grads: int,
                        tb: int = 4) -> ModelStateBytes:
    """FSDP2 with CPUOffloadPolicy (torch 2.13 _fully_shard): the sharded params are created on the host
    (_fsdp_param.py _init_sharded_param: `padded_sharded_param.cpu()`, pinned on CUDA), the sharded
    grads are copied to the host right after the reduce-scatter and accumulated there
    (_fsdp_collectives.py foreach_reduce: `new_sharded_grad.to(cpu)`, `grad._local_tensor +=`), and the
    optimizer steps those host tensors. The device keeps the gathered units (`buffers`, as FULL_SHARD)
    plus, per unit being gathered, the host shard copied in (`all_gather_inputs`: `.to(device)` in its
    stored dtype, fp32 for trainable params, then `_to_dtype_if_needed` to param_dtype) — conservatively
    the current and the prefetched unit. A deferred gradient sync keeps unsharded fp32 grads on the device.
    `tb`: bytes of a stored trainable element (4; pure bf16 2, then nothing is cast)."""
    stored_bpp = bpp + (tb - p) * trainable_frac   # trainable params stored fp32, gathered in param_dtype
    h2d = int(2 * unit / n * (stored_bpp + (p * trainable_frac if p < tb else 0)))
    return ModelStateBytes(params=0, grads=deferred_grads, master_params=0, optimizer_states=0,
                           buffers=buffers + h2d, cpu_bytes=sharded_params + sharded_grads + states)


def host_bytes_per_node(model: ModelSpec, strategy: Strategy, hw: HardwareSpec, per_rank_cpu: int,
                        precision: Precision, *, parallel: ParallelDims | None = None) -> int:
    """Peak host RAM per node: process overhead, offloaded state, and model loading.

    Loading is done once per node (meta init + local-rank-0 load + broadcast; zero.Init partitions
    at construction for ZeRO-3), so it costs one 16-bit copy per node, not gpus_per_node copies —
    on a mesh too (tp ranks take their slice of the same loaded copy); `per_rank_cpu` is already the
    mesh's per-rank offload, so `parallel` is only checked against the hardware.
    """
    if parallel is not None:
        mesh_of(strategy, hw, parallel)
    load = 0 if strategy.zero_stage == 3 else model.num_params * precision.param_bytes
    steady = hw.gpus_per_node * (HOST_BYTES_PER_RANK + per_rank_cpu)
    return max(steady, hw.gpus_per_node * HOST_BYTES_PER_RANK + load)
