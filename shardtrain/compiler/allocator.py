"""PyTorch's CUDA caching allocator: from the plan's allocated bytes to what `max_memory_reserved` and
nvidia-smi show, and to the figure that runs out of memory (issue 19 point 2). Pure: no torch.

The plan's per-term bytes are what `torch.cuda.max_memory_allocated` counts (live tensors). The caching
allocator holds more: it rounds every request, carves requests out of larger device segments and keeps
freed blocks cached for reuse (c10/cuda/CUDACachingAllocator.cpp, pytorch/pytorch commit
001074d25084fdb87a799823e395a50f5ec044d3; the rules below cite its functions):

- ``round_size``: every request is rounded up to a multiple of 512 B (``kMinBlockSize``), or to the next
  power-of-2 division when ``roundup_power2_divisions`` is configured for its size class;
- ``get_pool`` / ``get_allocation_size``: requests <= 1 MiB (``kSmallSize``) come from the small pool, in
  2 MiB segments (``kSmallBuffer``); 1-10 MiB requests get a 20 MiB segment (``kLargeBuffer``) that later
  requests of that size class share; >= 10 MiB (``kMinLargeAlloc``) requests get their own segment,
  rounded up to 2 MiB (``kRoundLarge``);
- ``should_split``: a large-pool block is split only when more than 1 MiB would remain (small pool and
  expandable segments: 512 B), so a fresh segment's tail either becomes a free cached block or is handed
  out with the tensor — reserved either way;
- blocks belong to the stream that allocated them: FSDP2's all-gather / reduce-scatter buffers live in
  their streams' segments, which the compute stream cannot reuse;
- ``expandable_segments:True`` (``ExpandableSegment``, ``try_allocate_expandable_block``): one growable
  virtual segment per stream and pool, mapped in pages of 20 MiB (large pool, ``kLargeBuffer``) or 2 MiB
  (small pool): reserved ~ allocated rounded up to pages, plus the free holes inside the segment.

Tensors that stay alive (parameters, gradients, fp32 masters, optimizer states: the same shapes every
step) only cost this rounding. Tensors allocated and freed every step (activations, the logits path, the
all-gather / reduce-scatter buffers) also fragment the cache: a freed block is reused only by a request it
can hold, so the reserved high-water mark exceeds the allocated one by a share of those bytes
(``FRAGMENTATION_FRACTION``; fitted, see there). The CUDA context, the cuBLAS/cuDNN handles and NCCL's
own buffers lie outside the allocator (``memory.CUDA_CONTEXT_BYTES``): nvidia-smi = reserved + them.

When cudaMalloc fails the allocator frees its cached, unsplit segments and retries (``alloc_block`` /
``release_cached_blocks``; with expandable segments it unmaps every free page): the memory a run needs is
at most its reserved peak. The planner's fit rule compares reserved + CUDA context with the GPU memory:
never below what a GPU with room would show (an under-estimate is an OOM).

Limits: the model assumes fixed shapes from step to step (packed samples, ``data.packing``). Shapes that
change every step (padding each micro-batch to its longest sample) fragment the non-expandable cache far
more: torchtune#1185 measured 16.39 GiB reserved with the default allocator against 10.83 GiB with
expandable segments for the same Llama-3-8B QLoRA run on unpacked Alpaca.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardtrain.compiler.specs import Engine
from shardtrain.compiler.memo import by_identity
from shardtrain.units import MiB

if TYPE_CHECKING:  # plan.py imports nothing from here; the planner passes MemoryBreakdowns in
    from shardtrain.compiler.inventory import TensorGroup
    from shardtrain.compiler.plan import MemoryBreakdown

K_MIN_BLOCK_BYTES = 512
"""kMinBlockSize: every request is rounded up to a multiple of it."""
K_SMALL_SIZE_BYTES = 1 * MiB
"""kSmallSize: the largest request served by the small pool."""
K_SMALL_BUFFER_BYTES = 2 * MiB
"""kSmallBuffer: small-pool segment size (and the small pool's expandable page)."""
K_MIN_LARGE_ALLOC_BYTES = 10 * MiB
"""kMinLargeAlloc: requests below it (and above kSmallSize) share 20 MiB segments."""
K_ROUND_LARGE_BYTES = 2 * MiB
"""kRoundLarge: larger requests get their own segment, rounded up to it."""
K_LARGE_BUFFER_BYTES = 20 * MiB
"""kLargeBuffer: the shared segment of 1-10 MiB requests, and the large pool's expandable page."""

PERSISTENT_TERMS = ("params", "grads", "master_params", "optimizer_states")
"""Terms whose tensors keep their shapes and addresses from step to step: rounding only."""
TRANSIENT_TERMS = ("activations", "logits", "buffers")
"""Terms allocated and freed within every step: these fragment the cache."""

FRAGMENTATION_FRACTION = {Engine.FSDP: 0.45, Engine.DEEPSPEED: 0.25, Engine.DDP: 0.10}
"""Default allocator (no expandable segments): reserved − allocated as a share of the transient bytes
at the peak. FSDP (fitted): the two published FSDP runs that report both peaks for one run, Llama-2-7B
LoRA on 4 × A100-40GB (meta-llama/llama-cookbook#41, awgu 2023-07-25: peak active 15.22 GB, reserved
19.36 GB, x1.272) and Llama-7B on 8 GPUs with the per-parameter FSDP prototype that became FSDP2
(llama-cookbook#165, 2023-09-05: active 14.93 GB, reserved 19.52 GB, x1.307). Transient share of the peak:
#41 78% (the frozen bf16 weights sharded 4 ways, 3.37 GB, are the persistent rest), #165 70% (assumed: the
setup is not stated); 0.35 and 0.44 needed, 0.45 covers both (tests/test_allocator.py PUBLISHED). Known
higher: a small FSDP2 run in ISEEKYAN/Megatron-LM#150 (2026-08, allocator settings not stated) shows
x1.62 / x1.46 (live peak 5258 / 3771 MiB, reserved 8512 / 5500 MiB), which this share does not reach.
DDP / one GPU (fitted): huggingface/peft#1469 (2024-10-11, torchtune's get_memory_stats after the
step): BERT-base full fine-tuning 12.56 -> 12.94 GiB (x1.030) and LoRA 10.01 -> 10.44 GiB (x1.044),
activation-dominated: 0.05 needed, 0.10 kept. DeepSpeed: no published pair found; between the two
(its flat partitions are few large tensors, its ZeRO-3 gathers run on a side stream like FSDP's) — not fitted."""
EXPANDABLE_FRAGMENTATION_FRACTION = 0.05
"""expandable_segments:True: the same share. Segments grow in place, so only holes inside a stream's
segment remain (freed blocks stay mapped until an OOM retry unmaps their pages). Not fitted: no
published run reports both peaks with expandable segments; torchtune#1185 shows its reserved peak 34%
below the default allocator's on the same run, so the share is small; 0.05 is a judgment."""
STREAMS = {Engine.FSDP: 4, Engine.DEEPSPEED: 2, Engine.DDP: 1}
"""Streams that allocate (each has its own segments / expandable segment): the compute stream, plus
FSDP2's all-gather copy-in, all-gather and reduce-scatter streams (_fsdp_param_group.py
_get_mp_streams); DeepSpeed's ZeRO gather/reduce side stream; DDP allocates its buckets on the
compute stream."""


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    # CUDACachingAllocator.cpp roundup_power2_next_division
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    low = size & ~(step - 1)
    return size if low == size else low + step


def round_size(size_bytes: int, roundup_power2_divisions: int = 0) -> int:
    """The block size a request of ``size_bytes`` asks the pool for (CUDACachingAllocator.cpp round_size;
    ``roundup_power2_divisions`` is PYTORCH_CUDA_ALLOC_CONF's value for this size class, 0 = unset)."""
    if size_bytes < K_MIN_BLOCK_BYTES:
        return K_MIN_BLOCK_BYTES
    d = roundup_power2_divisions
    if d > 1 and size_bytes > K_MIN_BLOCK_BYTES * d:
        return _roundup_power2_next_division(size_bytes, d)
    return K_MIN_BLOCK_BYTES * math.ceil(size_bytes / K_MIN_BLOCK_BYTES)


def segment_size(rounded_bytes: int) -> int:
    """The cudaMalloc size for a rounded request no cached block can serve (get_allocation_size)."""
    if rounded_bytes <= K_SMALL_SIZE_BYTES:
        return K_SMALL_BUFFER_BYTES
    if rounded_bytes < K_MIN_LARGE_ALLOC_BYTES:
        return K_LARGE_BUFFER_BYTES
    return K_ROUND_LARGE_BYTES * math.ceil(rounded_bytes / K_ROUND_LARGE_BYTES)


def reserved_for(size_bytes: int, count: int, *, expandable: bool = False) -> int:
    """Reserved bytes for ``count`` live tensors of ``size_bytes`` each, allocated one after another from
    an empty cache (no frees in between). Default allocator: small and 1-10 MiB requests share their
    pool's segments (as many per segment as fit), larger ones get one segment each; expandable segments:
    the rounded blocks tile the stream's segment (page rounding is counted once per stream by
    :func:`predict`)."""
    if count <= 0 or size_bytes <= 0:
        return 0
    r = round_size(size_bytes)
    if expandable:
        return count * r
    seg = segment_size(r)
    if r >= K_MIN_LARGE_ALLOC_BYTES:
        return count * seg
    per_segment = seg // r
    return math.ceil(count / per_segment) * seg


def persistent_slack(groups: Iterable[TensorGroup], term_bytes: Mapping[str, int], *,
                     expandable: bool) -> int:
    """Reserved − allocated of the persistent terms: each term's bytes spread over the tensors that hold
    them (parameters: every tensor; gradients, masters, optimizer states: the trainable ones) in
    proportion to their elements — a rank's shard of each tensor under FSDP, the whole tensor under DDP —
    and each tensor rounded as :func:`reserved_for` does. DeepSpeed keeps flat partitions (a few large
    tensors): this per-tensor count is an upper bound there."""
    gs = tuple(groups)
    slack = 0
    for term in PERSISTENT_TERMS:
        b = int(term_bytes.get(term, 0))
        held = [g for g in gs if term == "params" or g.trainable]
        elems = sum(g.total for g in held)
        if b <= 0 or elems <= 0:
            continue
        per_elem = b / elems
        for g in held:
            size = math.ceil(g.numel * per_elem)
            slack += reserved_for(size, g.count, expandable=expandable) - size * g.count
    return max(slack, 0)


@by_identity
def _slack(groups: tuple[TensorGroup, ...], persistent: tuple[int, ...], expandable: bool) -> int:
    # the planner asks once per candidate (~thousands a plan) with a few distinct model states
    return persistent_slack(groups, dict(zip(PERSISTENT_TERMS, persistent)), expandable=expandable)


@dataclass(frozen=True)
class AllocatorFigures:
    """The three per-GPU peaks a run can report, predicted for one candidate."""
    peak_allocated_bytes: int
    """torch.cuda.max_memory_allocated: the plan's terms at its peak phase, without the CUDA context."""
    peak_reserved_bytes: int
    """torch.cuda.max_memory_reserved: the caching allocator's segments at their high-water mark."""
    cuda_context_bytes: int
    """Outside the allocator: CUDA context, library workspaces, NCCL buffers (memory.CUDA_CONTEXT_BYTES)."""

    @property
    def nvidia_smi_bytes(self) -> int:
        """What nvidia-smi shows for the process: reserved + everything outside the allocator."""
        return self.peak_reserved_bytes + self.cuda_context_bytes

    @property
    def fragmentation_bytes(self) -> int:
        return self.peak_reserved_bytes - self.peak_allocated_bytes


def _transient(b: MemoryBreakdown) -> int:
    return sum(int(getattr(b, t)) for t in TRANSIENT_TERMS)


def phase_reserved(b: MemoryBreakdown, *, slack: int, engine: Engine, expandable: bool) -> int:
    """Reserved bytes at one phase's peak instant: its allocated bytes, the persistent rounding and the
    fragmentation share of its transient bytes (plus, with expandable segments, a partly used page per
    stream and pool)."""
    allocated = int(b.total) - int(b.cuda_context)
    if expandable:
        frag = EXPANDABLE_FRAGMENTATION_FRACTION * _transient(b)
        pages = STREAMS[engine] * K_LARGE_BUFFER_BYTES + K_SMALL_BUFFER_BYTES
        return allocated + slack + math.ceil(frag) + pages
    return allocated + slack + math.ceil(FRAGMENTATION_FRACTION[engine] * _transient(b))


def side_stream_cached(b: MemoryBreakdown, side_pools: tuple[int, int]) -> int:
    """Bytes the side streams' segments hold beyond what phase ``b`` counts as live (expandable segments
    only, see :func:`predict`): the all-gather pool's high-water mark (its outputs are freed right after
    the copy-out, so the phases count them only at the instants they exist) and the reduce-scatter pool's
    less the gradients live at ``b`` (the sharded gradients are that pool's tensors)."""
    ag, rs = side_pools
    return ag + max(rs - int(b.grads), 0)


def predict(phases: Mapping[str, MemoryBreakdown], groups: Iterable[TensorGroup], engine: Engine, *,
            expandable: bool, side_pools: tuple[int, int] = (0, 0)) -> AllocatorFigures:
    """The figures for one candidate from its per-phase breakdowns (compiler/phases.py). Reserved is a
    high-water mark: the largest phase's, never below the allocated peak.

    ``side_pools``: (all-gather, reduce-scatter) bytes that FSDP2's side streams keep in their own
    segments (phases.fsdp_side_stream_pools). Blocks belong to the stream that allocated them
    (CUDACachingAllocator.cpp get_free_block only reuses a block of the request's stream; expandable
    segments: one segment per stream), so they add to the compute stream's reserved peak. Not fitted: the
    sizes follow from FSDP2's code. Checked against torchtitan's Llama 3.1 8B FSDP rows
    (benchmarks/published, 8 and 128 H100s, expandable segments, max_memory_reserved): 16.5% / 13.0%
    under without them, 9.1% / 9.1% with. The default allocator: never below what expandable segments
    would hold for the same requests (it rounds more and cannot unmap a segment's free tail), else its
    fitted FRAGMENTATION_FRACTION, fitted on FSDP runs whose reserved figures contain these pools."""
    bs = list(phases.values())
    peak = max(bs, key=lambda b: b.total)
    allocated = int(peak.total) - int(peak.cuda_context)
    persistent = tuple(max(int(getattr(b, t)) for b in bs) for t in PERSISTENT_TERMS)
    side = side_pools if engine is Engine.FSDP else (0, 0)
    exp_slack = _slack(tuple(groups), persistent, True)
    reserved = max(phase_reserved(b, slack=exp_slack, engine=engine, expandable=True)
                   + side_stream_cached(b, side) for b in bs)
    if not expandable:
        slack = _slack(tuple(groups), persistent, False)
        reserved = max(reserved, *(phase_reserved(b, slack=slack, engine=engine, expandable=False) for b in bs))
    return AllocatorFigures(peak_allocated_bytes=allocated, peak_reserved_bytes=max(reserved, allocated),
                            cuda_context_bytes=int(peak.cuda_context))
