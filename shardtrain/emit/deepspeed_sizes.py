"""What a plan's mesh and size mean for DeepSpeed, without its key names (emit/deepspeed.py spells those
and re-exports everything here): the world size of DeepSpeed's batch arithmetic, the Ulysses degree, which
meshes DeepSpeed runs, and the NVMe swap buffers of ZeRO-Infinity per rank. Pure; no deepspeed import.
"""
from __future__ import annotations

import math

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import CpMode

NVME_MIN_BUFFER_ELEMENTS = 10**8
"""offload_param.buffer_size floor (DeepSpeed default 1e8 elements) unless the whole partition is smaller."""
AIO_ALIGN_ELEMENTS = 1024
"""Round swap buffers to whole aio blocks of 16-bit elements (AIO_ALIGNED_BYTES multiples)."""


class DeepSpeedConfigError(ValueError):
    """An illegal plan/option combination: names the key, the value and the fix."""

    def __init__(self, key: str, value: object, problem: str, fix: str):
        super().__init__(f"{key}: {value!r}: {problem}; fix: {fix}")
        self.key, self.value, self.problem, self.fix = key, value, problem, fix


def largest_param_elements(plan: Plan) -> int:
    """Elements of the largest single parameter tensor (embedding, lm_head, a linear or fused experts)."""
    m = plan.model
    per_tensor = [s.weight_params if s.fused_parameter else s.in_features * s.out_features for s in m.linear_shapes()]
    return max([m.embedding_params, m.lm_head_params, *per_tensor])


def nvme_buffer_elements(plan: Plan) -> int:
    """offload_param.buffer_size (= sub_group_size): at least the largest ZeRO-3 partition of one
    param (partitioned_param_swapper.py asserts numel <= buffer_size), DeepSpeed's 1e8 default
    otherwise, or the whole partition when that is smaller. sub_group_size follows it because
    stage3._initialize_from_swapped_fp16_params asserts the fp16 swap buffers can hold an fp32
    sub-group. Pinned host RAM per rank: buffer_count × this × 2 B (params) + 4 × this × 4 B (optimizer)."""
    # ZeRO-3 partitions over the ranks that reduce gradients (dp × sp: DeepSpeed's seq_data_parallel
    # group), not the world
    w = plan.parallel.grad_reduce
    part = math.ceil(largest_param_elements(plan) / w)
    n = max(part, min(NVME_MIN_BUFFER_ELEMENTS, math.ceil(plan.model.num_params / w)))
    return math.ceil(n / AIO_ALIGN_ELEMENTS) * AIO_ALIGN_ELEMENTS


def nvme_param_buffer_count(plan: Plan) -> int:
    """One buffer per swappable tensor of the layer in flight plus the prefetched one (>= 5, the default)."""
    return max(5, len(plan.model.linear_shapes()) + 2)


def batch_world(plan: Plan) -> int:
    """The world size in DeepSpeed's own batch arithmetic (runtime/config.py DeepSpeedConfig.__init__ and
    _batch_assertion: train_batch_size == micro × accumulation × world_size). Without an mpu DeepSpeed takes
    world_size = dist.get_world_size(), divided by sequence_parallel_size when the config has it (ALST's mpu
    gives the same: world / sp); AutoTP does not divide it (deepspeed.initialize builds the config before
    the tp groups; accelerate's _prepare_deepspeed also fills "auto" as micro × accum × num_processes // sp).
    So it is dp × tp: the samples per step are still micro × accumulation × dp (tp peers are fed the same
    batch: engine.py check_dataloader_inputs_same_across_ranks), DeepSpeed just counts each tp rank."""
    p = plan.parallel
    return p.dp * p.tp


def sequence_parallel_size(plan: Plan) -> int:
    """DeepSpeed's sequence_parallel_size: the plan's cp (Ulysses); 1 without context parallel."""
    return plan.parallel.cp


def check_mesh(plan: Plan) -> None:
    """What DeepSpeed runs of a mesh (issue 18 point 2): cp only as Ulysses (sequence_parallel_size), tp only
    as AutoTP with ZeRO-1/2, not both at once (ALST's groups have no tp dim), no HSDP dim (ZeRO partitions
    over the whole data-parallel group: dp_replicate belongs to FSDP2)."""
    p, s = plan.parallel, plan.chosen.strategy
    if p.cp > 1 and p.cp_mode is not CpMode.ULYSSES:
        raise DeepSpeedConfigError("parallel.cp_mode", p.cp_mode.value, "DeepSpeed runs context parallel only as "
                                   "Ulysses (sequence_parallel_size); ring attention is torch's (FSDP2)",
                                   "set parallel.cp_mode: ulysses (--cp-mode ulysses), or an fsdp_* strategy")
    if p.tp > 1 and s.zero_stage not in (1, 2):
        raise DeepSpeedConfigError("parallel.tp", p.tp, f"DeepSpeed AutoTP trains with ZeRO-1/2 only, not {s.value}",
                                   "use zero1 or zero2 (--strategy zero2), or an fsdp_* strategy for tp with "
                                   "sharded parameters, or parallel.tp: 1")
    if p.tp > 1 and p.cp > 1:
        raise DeepSpeedConfigError("parallel", p.label(), "DeepSpeed cannot combine AutoTP with Ulysses "
                                   "sequence parallel (ALST's process groups have no tp dim)",
                                   "use parallel.tp: 1 or parallel.cp: 1 on DeepSpeed, or an fsdp_* strategy")
    if p.dp_replicate > 1 and p.dp_shard > 1:
        raise DeepSpeedConfigError("parallel.dp_replicate", p.dp_replicate, "ZeRO partitions over every "
                                   "data-parallel rank; a replicate dim (HSDP) is FSDP2's", "use parallel.dp_replicate: "
                                   "1 with DeepSpeed, or fsdp_full_shard for HSDP")
