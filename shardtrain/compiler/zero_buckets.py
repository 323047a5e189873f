"""DeepSpeed ZeRO bucket sizes shardtrain emits and the memory model assumes (compiler/memory.py
re-exports them; emit/deepspeed.py writes them through Plan.zero_buckets)."""
from __future__ import annotations

from dataclasses import dataclass

from shardtrain.compiler.model import ModelSpec


MIN_BUCKET_ELEMENTS = 25 * 2**20 // 4
"""The smallest DeepSpeed reduce/all-gather bucket we emit: DDP's default bucket_cap_mb=25
(torch/nn/parallel/distributed.py) in fp32 elements. Below it each collective's fixed cost
dominates: HF's h² rule gives a 512-hidden model 100 reduce buckets per step. Measured on 2 CPU
ranks (gloo; benchmarks/worker_ab.py --variants default,h2-buckets, results/worker_ab.md): with h²
the ZeRO-2 step took 1.51x as long for the 0.43M tiny Llama (77.1 vs 50.9 ms) and 1.07x for the 26M
model (2.39 vs 2.22 s)."""


@dataclass(frozen=True)
class ZeroBuckets:
    """DeepSpeed bucket sizes in elements. HF's DeepSpeed integration uses reduce = h²,
    prefetch = 0.9·h², persistence = 10·h; reduce and all-gather buckets are raised to at least
    MIN_BUCKET_ELEMENTS, but never beyond the model's parameter count: DeepSpeed allocates the
    whole reduce_bucket_size per ipg buffer (stage_1_and_2.py setup_buckets, x2 with overlap_comm)
    even when the model is smaller, so a bigger one is memory spent on nothing. (LoRA: the buffers
    appear with the first adapter gradient, after the frozen head's backward, so they may miss the
    backward peak; capped at the adapters' count they are small enough not to matter, measured in
    tests/runtime/test_peak_truth.py.)"""
    reduce_bucket_elements: int
    allgather_bucket_elements: int
    prefetch_bucket_elements: int
    param_persistence_threshold: int
    max_live_parameters: int = 10**9
    max_reuse_distance: int = 10**9

    @staticmethod
    def for_model(model: ModelSpec, trainable_params: int | None = None, *, offload: bool = False) -> "ZeroBuckets":
        """`trainable_params` (LoRA: the adapters; default: every parameter) caps the raised buckets.
        `offload` (ZeRO-Offload / Infinity) keeps h²: there the host optimizer dominates the step, and
        the device's in-flight gradient term (model_state_bytes) was measured with gradients larger
        than the bucket (tests/test_truth_engines.py)."""
        h = model.hidden_size
        cap = model.num_params if trainable_params is None else trainable_params
        comm = h * h if offload else max(h * h, min(MIN_BUCKET_ELEMENTS, cap))
        return ZeroBuckets(reduce_bucket_elements=comm, allgather_bucket_elements=comm,
                           prefetch_bucket_elements=int(0.9 * h * h), param_persistence_threshold=10 * h)
