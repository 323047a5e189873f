"""DeepSpeed ZeRO-1/2 flat-buffer layout: which tensors each rank's partition holds.

Stage 1/2 flattens the trainable tensors, in module order, into one 16-bit buffer split in N equal
slices (stage_1_and_2.py, DeepSpeed 0.19.8); a rank's `grads_in_partition` buffer is sized by the
*whole* tensors that overlap its slice (get_partition_info / copy_grads_in_partition), so the worst
rank can hold much more than T/N (a 128k-vocab embedding straddling many small slices). This module
simulates that layout for compiler/memory.py (checked against the real engine in
tests/test_truth_engines.py).
"""
from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

from shardtrain.compiler.inventory import TensorGroup
from shardtrain.compiler.model import ModelSpec


def flat_order_numels(model: ModelSpec, groups: tuple[TensorGroup, ...]) -> list[int]:
    """Element counts of the trainable tensors in module (named_parameters) order — the order in which
    DeepSpeed ZeRO-1/2 lays them into its flat 16-bit buffer: embed_tokens, then per decoder layer the
    attention and MLP projections (weight, bias, LoRA A, LoRA B, as peft registers them), the router,
    the layer norms; then the final norm and lm_head (HF Llama-family module layout)."""
    L = model.num_layers
    by_name = {g.name: g for g in groups if g.trainable}
    per_layer: list[str] = []
    for s in model.linear_shapes():
        if s.fused_parameter and "router" not in per_layer:
            per_layer.append("router")
        per_layer += [s.name, s.name + ".bias", s.name + ".lora_A", s.name + ".lora_B"]
    per_layer += ["router", "layer_norms"]
    order: list[int] = []
    used: set[str] = set()
    if "embed_tokens" in by_name:
        order.append(by_name["embed_tokens"].numel)
        used.add("embed_tokens")
    layer_groups = [by_name[n] for n in dict.fromkeys(per_layer) if n in by_name and by_name[n].count % L == 0]
    for _ in range(L):
        for g in layer_groups:
            order += [g.numel] * (g.count // L)
    used.update(g.name for g in layer_groups)
    for name in ("norm", "lm_head", "other"):
        if name in by_name:
            order += [by_name[name].numel] * by_name[name].count
            used.add(name)
    for g in groups:  # anything not placed above (keeps totals exact)
        if g.trainable and g.name not in used:
            order += [g.numel] * g.count
    return order


@dataclass(frozen=True)
class Zero12Partition:
    """DeepSpeed ZeRO-1/2 flat-buffer partition of one rank (elements)."""
    partition: int
    """P: the rank's slice of the flat buffer (padded to a multiple of 2·N, stage_1_and_2.py
    `nccl_start_alignment_factor * world_size`)."""
    grad_buffer: int
    """`grads_in_partition`: whole tensors overlapping the slice (copy_grads_in_partition)."""
    held_large: int
    """ZeRO-1 backward peak of gradients held outside the buckets: tensors larger than the reduce
    bucket are reduced from their own storage (`extra_large_param_to_reduce`); those outside this
    rank's slice are kept until the epilogue, one inside it until it is copied into the buffer."""
    held_offload_accum: int = 0
    """ZeRO-2 + optimizer offload, a micro-step that is not the accumulation boundary: the peak of the
    device gradients in the backward. copy_grads_in_partition -> async_accumulate_grad_in_cpu_via_gpu
    accumulates this rank's gradients into `accumulated_grads_in_cpu` but, unlike the boundary path
    (async_inplace_copy_grad_to_fp32_buffer_from_gpu -> clear_grad_attribute), never frees `param.grad`:
    the in-partition tensors larger than the bucket keep their own storage until the backward epilogue
    (`_clear_param_grad_only`), the others are views into the ipg buckets. Backward runs in reverse
    module order, so at tensor k in flight: the large in-slice tensors after k, plus k itself."""
    held_zero1_accum: int = 0
    """ZeRO-1 (partition_gradients False) with gradient_accumulation_steps > 1: the backward peak of the
    gradients in their own storage plus `grads_in_partition` (see _zero1_accum_held)."""


def _offload_accum_held(numels: tuple[int, ...], large_prefix: list[int], prefix_max: list[int],
                        i_lo: int, i_hi: int, bucket: int) -> int:
    """Zero12Partition.held_offload_accum for the rank owning tensors [i_lo, i_hi)."""
    total = len(numels)
    large_in_r = large_prefix[i_hi] - large_prefix[i_lo]
    # in flight before the slice's tensors are produced (indices >= i_hi: nothing of r held yet),
    # after all of them (indices < i_lo: every large in-slice gradient held)
    suffix = max(numels[i_hi:], default=0) if i_hi < total else 0
    held = max(suffix, large_in_r + prefix_max[i_lo] if i_lo > 0 else 0)
    done = 0   # large in-slice tensors already produced (indices > k)
    for k in range(i_hi - 1, i_lo - 1, -1):
        held = max(held, done + numels[k])
        if numels[k] > bucket:
            done += numels[k]
    return held


def _zero1_flush_own(numels: tuple[int, ...], bucket: int) -> list[int]:
    """own[j]: elements of gradients in their own storage when the boundary backward reduces the bucket
    holding tensor j (stage 1 + accumulation, before that reduction frees anything). Off the boundary
    stage 1 reduces nothing (reduce_ready_partitions_and_remove_grads needs partition_gradients or the
    boundary; engine.allreduce_gradients communicates "only at gradient accumulation boundaries"), so
    every param.grad is held in full; in the boundary backward (reverse module order) a bucket-sized
    gradient moves into the ipg bucket (`grad_reduc.data = new_grad_tensor`), a larger one keeps its
    storage (`extra_large_param_to_reduce`), and a tensor that would overflow the bucket reduces it
    first (reduce_independent_p_g_buckets_and_remove_grads). The epilogue reduces the rest."""
    own = [0] * len(numels)
    below = sum(numels)     # tensors not yet processed (index <= k): still in their own storage
    large_done, elements, pending = 0, 0, []
    for k in range(len(numels) - 1, -1, -1):
        if elements + numels[k] > bucket:
            for j in pending:
                own[j] = below + large_done
            pending, elements = [], 0
        pending.append(k)
        elements += numels[k]
        below -= numels[k]
        if numels[k] > bucket:
            large_done += numels[k]
    for j in pending:   # independent_gradient_partition_epilogue -> reduce_ipg_grads
        own[j] = large_done
    return own


def _zero1_accum_held(total: int, largest: int, bucket: int, own_at_first_reduce: int, grad_buffer: int) -> int:
    """Zero12Partition.held_zero1_accum. Two instants: the start of the boundary backward, where every
    held gradient (T) is still in its own storage and the first new gradient is added into it in place
    (AccumulateGrad) — counted for a tensor above the bucket, as held_large counts it at
    accumulation 1 (a bucket-sized one is transient and not in any engine object); and the first
    reduction holding one of this rank's tensors, where copy_grads_in_partition allocates
    `grads_in_partition` (the rank's extent) while the unreduced gradients still hold their storage.
    Measured: tiny Llama, accumulation 2, 4 gloo ranks: T x p on every rank, 2.2x (fp32) the
    accumulation-1 formula (tests/runtime/test_zero1_accum_world4.py)."""
    in_flight = largest if largest > bucket else 0
    return max(total + in_flight, own_at_first_reduce + grad_buffer)


def zero12_partitions(numels: list[int] | tuple[int, ...], n: int, bucket: int) -> list[Zero12Partition]:
    """Per-rank ZeRO-1/2 layout: stage_1_and_2.py get_partition_info() puts a tensor in rank r's
    partition if it starts inside the slice or straddles its start. O(tensors + N)."""
    return list(_zero12_partitions(tuple(numels), n, bucket))


@functools.lru_cache(maxsize=256)
def _zero12_partitions(numels: tuple[int, ...], n: int, bucket: int) -> tuple[Zero12Partition, ...]:
    total = sum(numels)
    align = 2 * n
    part = math.ceil(total / align) * align // n if total else 0
    starts, acc = [], 0
    for k in numels:
        starts.append(acc)
        acc += k
    prefix = [0]
    large_prefix = [0]
    prefix_max = [0]   # prefix_max[i] = largest of numels[:i]
    for k in numels:
        prefix.append(prefix[-1] + k)
        large_prefix.append(large_prefix[-1] + (k if k > bucket else 0))
        prefix_max.append(max(prefix_max[-1], k))
    largest = max(numels, default=0)
    own = _zero1_flush_own(numels, bucket)
    out = []
    for r in range(n):
        lo, hi = r * part, (r + 1) * part
        if lo >= total:
            out.append(Zero12Partition(part, 0, large_prefix[-1], largest,
                                       _zero1_accum_held(total, largest, bucket, 0, 0)))
            continue
        i_lo = bisect.bisect_right(starts, lo) - 1
        i_hi = bisect.bisect_left(starts, hi)
        buf = prefix[i_hi] - prefix[i_lo]
        large_in_r = large_prefix[i_hi] - large_prefix[i_lo]
        held = large_prefix[-1] - large_in_r    # at the epilogue: every large gradient outside r
        # backward runs in reverse module order: while an in-slice large gradient k is pending, the
        # outside-slice large gradients produced before it (indices > k) are held as well
        in_r_after = 0
        for k in range(i_hi - 1, i_lo - 1, -1):
            if numels[k] > bucket:
                outside_after = (large_prefix[-1] - large_prefix[k + 1]) - in_r_after
                held = max(held, outside_after + numels[k])
                in_r_after += numels[k]
        out.append(Zero12Partition(part, buf, held,
                                   _offload_accum_held(numels, large_prefix, prefix_max, i_lo, i_hi, bucket),
                                   _zero1_accum_held(total, largest, bucket, own[i_hi - 1], buf)))
    return tuple(out)


def zero2_offload_accum_grads(parts: list[Zero12Partition], p: int) -> tuple[int, int]:
    """(device, host) gradient bytes of ZeRO-2 + optimizer offload with gradient_accumulation_steps > 1,
    worst rank (DeepSpeed 0.19.8 stage_1_and_2.py, grad_accum_dtype = the model dtype, our emitted
    default). Off the accumulation boundary, reduce_ipg_grads -> copy_grads_in_partition takes the
    `micro_step_id > 0 or not is_gradient_accumulation_boundary()` branch:
    async_accumulate_grad_in_cpu_via_gpu adds the host copy into `param.grad` through
    temp_grad_buffer_for_gpu_offload (already a buffer) and copies it back to
    `accumulated_grads_in_cpu[param_id]` — one host tensor per in-partition parameter of the *whole*
    param.numel() in param.dtype (buffer_to_accumulate_to_in_cpu), i.e. p x the rank's
    grads_in_partition extent, kept for the whole run. The branch never calls clear_grad_attribute
    (only the boundary's async_inplace_copy_grad_to_fp32_buffer_from_gpu does), so every in-partition
    gradient larger than reduce_bucket_size (`extra_large_param_to_reduce`, own storage) stays on the
    device until the epilogue's `_clear_param_grad_only` (Zero12Partition.held_offload_accum).
    Measured (tests/runtime/test_state_bytes_vs_plan.py, tiny Llama, 2 gloo ranks, accumulation 2,
    h^2 = 16384-element bucket): device grads 3.5x the p x largest modelled before."""
    device = p * max((r.held_offload_accum for r in parts), default=0)
    host = p * max((r.grad_buffer for r in parts), default=0)
    return device, host
