"""Per-GPU model-state memory (params, grads, master params, optimizer states, comm buffers) for
every strategy, plus host RAM and NVMe per node — modelled on what the engines really allocate.

Baseline (ZeRO paper, Rajbhandari et al. 2020, K=12): mixed-precision Adam costs 2+2+12 = 16 B/param;
ZeRO-1 4Ψ + 12Ψ/N, ZeRO-2 2Ψ + 14Ψ/N, ZeRO-3 16Ψ/N. The engines differ in the split, and the runtime
(shardtrain.runtime) follows the same dtype policy that is modelled here:
- DDP / FSDP2 (torch): trainable params stay fp32 and compute runs under autocast (DDP) or the
  MixedPrecisionPolicy (FSDP2, param_dtype=16-bit, reduce_dtype=fp32): params 4, grads 4, no master
  copy, states K-4 = 8 — the same 16 B/param, split differently. Frozen (LoRA base) weights are stored
  in the compute dtype; QLoRA base Linear weights in NF4.
- DeepSpeed ZeRO (stage_1_and_2.py, stage3.py): the module is cast to 16-bit; the optimizer keeps an
  fp32 master partition (`single_partition_of_fp32_groups` / `fp32_partitioned_groups_flat`, 4Ψ/N)
  and an fp32 gradient partition at step time (4Ψ/N); 16-bit gradients live in param.grad (stage 1,
  full), in the averaged partition (stage 2, Ψ/N) or in the flat grad partition (stage 3, Ψ/N).
QLoRA (Dettmers et al. 2023): NF4 4 bits + fp32 absmax per 64 (0.5 bit) or double-quantised 8-bit
absmax per 64 + fp32 per 256 blocks (0.127 bit) -> 4.127 bits = 0.516 B/param.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from shardtrain.compiler.inventory import TensorGroup
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.optimizer_states import state_bytes
from shardtrain.compiler.specs import Engine, HardwareSpec, Method, OffloadDevice, Optimizer, Precision, Strategy

GiB = 2**30
MiB = 2**20

CUDA_CONTEXT_BYTES = 768 * MiB
"""CUDA context + cuBLAS/cuDNN workspaces + NCCL communicator buffers per GPU (calibratable:
~500 MiB context on H100 with torch 2.x, plus NCCL channels)."""
HOST_BYTES_PER_RANK = 3 * GiB
"""Host RSS of one training process before model states (Python, torch, CUDA host runtime)."""
DDP_BUCKET_BYTES = 25 * MiB
"""torch DDP bucket_cap_mb default; with gradient_as_bucket_view grads are the buckets, so only the
in-flight collective needs an extra bucket (two, for overlap)."""
QLORA_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""NF4 + double quantisation: 0.5 B + 8-bit absmax per 64 + fp32 absmax per 256 blocks."""
QLORA_BYTES_PER_PARAM_NO_DQ = 0.5 + 4 / 64
"""NF4 without double quantisation."""
QLORA_QUANT_STATE_BYTES_PER_TENSOR = 16 * 4 + 4 + 256 * 4
"""Per quantized tensor, bitsandbytes 0.50.2 functional.quantize_4bit keeps a QuantState with its own
`code` (16 fp32 NF4 levels) and, with double quantisation, `offset` (fp32 scalar) and a nested
state2 whose `code` is a 256-entry fp32 map (quantize_blockwise) — 1092 B per tensor, checked
against a real 4-bit load in tests/test_memory_model.py (negligible beyond toy models)."""
INFINITY_SWAP_BUFFERS = 5
"""DeepSpeed offload_{param,optimizer}.buffer_count default for NVMe swapping."""


@dataclass(frozen=True)
class ZeroBuckets:
    """DeepSpeed bucket sizes in elements (from the hidden size unless the user sets them).
    HF's DeepSpeed integration uses reduce = h², prefetch = 0.9·h², persistence = 10·h."""
    reduce_bucket_elements: int
    allgather_bucket_elements: int
    prefetch_bucket_elements: int
    param_persistence_threshold: int
    max_live_parameters: int = 10**9
    max_reuse_distance: int = 10**9

    @staticmethod
    def for_model(model: ModelSpec) -> "ZeroBuckets":
        h = model.hidden_size
        return ZeroBuckets(reduce_bucket_elements=h * h, allgather_bucket_elements=h * h,
                           prefetch_bucket_elements=int(0.9 * h * h), param_persistence_threshold=10 * h)


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


def shard_group_size(strategy: Strategy, hw: HardwareSpec) -> int:
    """Ranks that share one copy of the sharded state (HYBRID shards inside a node only)."""
    if strategy is Strategy.DDP:
        return 1
    if strategy is Strategy.FSDP_HYBRID_SHARD:
        return hw.gpus_per_node
    return hw.world_size


def zero3_persistent_params(groups: tuple[TensorGroup, ...], buckets: ZeroBuckets) -> int:
    """Elements of the parameters ZeRO-3 never re-partitions: DeepSpeed parameter_offload.py
    mark_persistent_parameters() marks every parameter (trainable or frozen) with
    `ds_numel <= stage3_param_persistence_threshold` as `ds_persist`; after the first forward it
    stays gathered on every rank (its partition `ds_tensor` is kept too)."""
    return sum(g.total for g in groups if g.numel <= buckets.param_persistence_threshold)


def _largest_unit_params(model: ModelSpec) -> int:
    """Largest FSDP unit / ZeRO-3 gathered module: one decoder layer, or the embedding/lm_head."""
    return max(model.per_layer_params, model.embedding_params, model.lm_head_params)


def model_state_bytes(model: ModelSpec, groups: tuple[TensorGroup, ...], strategy: Strategy,
                      hw: HardwareSpec, *, method: Method, precision: Precision, optimizer: Optimizer,
                      fsdp_defer_grad_sync: bool = False) -> ModelStateBytes:
    """Model-state bytes per rank for one strategy (see module docstring for the dtype policy)."""
    T = sum(g.total for g in groups if g.trainable)
    frozen = frozen_weight_bytes(groups, method, precision)
    p = precision.param_bytes
    N = shard_group_size(strategy, hw)
    engine = strategy.engine
    buckets = ZeroBuckets.for_model(model)

    if engine is Engine.DDP:
        states = state_bytes(optimizer, groups)
        return ModelStateBytes(params=4 * T + frozen, grads=4 * T, master_params=0,
                               optimizer_states=states, buffers=2 * DDP_BUCKET_BYTES)

    if engine is Engine.FSDP:
        states = state_bytes(optimizer, groups, shard=N)
        sharded_params = math.ceil((4 * T + frozen) / N)
        grads = math.ceil(4 * T / N)
        unit = _largest_unit_params(model)
        # all-gather of the current + prefetched unit in param_dtype, and the unsharded 16-bit grads
        # of one unit plus their fp32 reduce-scatter copy (torch/distributed/fsdp/_fully_shard).
        buffers = 2 * unit * p + unit * (p + 4)
        if strategy is Strategy.FSDP_SHARD_GRAD_OP:
            # reshard_after_forward=False keeps every unit's unsharded params from forward to backward
            buffers += (model.num_params - unit) * p
        if fsdp_defer_grad_sync:
            # set_requires_gradient_sync(False) accumulates unsharded fp32 grads across micro-steps
            grads += 4 * T
        return ModelStateBytes(params=sharded_params, grads=grads, master_params=0,
                               optimizer_states=states, buffers=buffers)

    # DeepSpeed ZeRO
    stage = strategy.zero_stage
    master = math.ceil(4 * T / N) if precision is not Precision.FP32 else math.ceil(4 * T / N)
    fp32_grad_partition = math.ceil(4 * T / N) if precision is not Precision.FP32 else 0
    states = state_bytes(optimizer, groups, shard=N, flat_partitions=True)
    if stage in (1, 2):
        params = p * T + frozen
        grads = (p * T if stage == 1 else math.ceil(p * T / N)) + fp32_grad_partition
        # overlap_comm double-buffers the reduce bucket (ipg_buffer x2) in 16-bit + allgather bucket
        buffers = 2 * buckets.reduce_bucket_elements * p + buckets.allgather_bucket_elements * p
    else:
        params = math.ceil((p * T + frozen) / N)
        grads = math.ceil(p * T / N) + fp32_grad_partition
        gathered = min(buckets.max_live_parameters, _largest_unit_params(model) + buckets.prefetch_bucket_elements)
        buffers = gathered * p + 2 * buckets.reduce_bucket_elements * p
    cpu = nvme = 0
    off_opt, off_par = strategy.offload_optimizer, strategy.offload_params
    if off_opt is not OffloadDevice.NONE:
        # DeepSpeedCPUAdam updates fp32 master + states on the host; grads are copied there (fp32).
        host = master + states + math.ceil(4 * T / N)
        grads = 0  # partitions stream out through the reduce buckets
        if off_opt is OffloadDevice.CPU:
            cpu += host
        else:  # NVMe: states swapped through pinned buffers; fp32 grads stay on the host
            nvme += master + states
            cpu += math.ceil(4 * T / N) + 2 * INFINITY_SWAP_BUFFERS * buckets.reduce_bucket_elements * 4
        master = states = 0
    if off_par is not OffloadDevice.NONE:
        if off_par is OffloadDevice.CPU:
            cpu += params
        else:
            nvme += params
            cpu += INFINITY_SWAP_BUFFERS * _largest_unit_params(model) * p
        params = 0
    return ModelStateBytes(params=params, grads=grads, master_params=master, optimizer_states=states,
                           buffers=buffers, cpu_bytes=cpu, nvme_bytes=nvme)


def host_bytes_per_node(model: ModelSpec, strategy: Strategy, hw: HardwareSpec, per_rank_cpu: int,
                        precision: Precision) -> int:
    """Peak host RAM per node: process overhead, offloaded state, and model loading.

    Loading is done once per node (meta init + local-rank-0 load + broadcast; zero.Init partitions
    at construction for ZeRO-3), so it costs one 16-bit copy per node, not gpus_per_node copies.
    """
    load = 0 if strategy.zero_stage == 3 else model.num_params * precision.param_bytes
    steady = hw.gpus_per_node * (HOST_BYTES_PER_RANK + per_rank_cpu)
    return max(steady, hw.gpus_per_node * HOST_BYTES_PER_RANK + load)
