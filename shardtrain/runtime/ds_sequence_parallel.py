"""DeepSpeed's own Ulysses sequence parallel (ALST, Arctic Long Sequence Training; DeepSpeed 0.19.8
deepspeed/runtime/sequence_parallel/ulysses_sp.py) for the DeepSpeed engine when the emitted
ds_config.json has `sequence_parallel_size` > 1 (emit/deepspeed.py writes the plan's cp there).

What we use of it, and why:
- `UlyssesSPAttentionHF.register_with_transformers`: builds its mpu (parallel_state_sp: sp groups of
  consecutive ranks, one sequence-data-parallel group of all ranks) and replaces the model's core
  kernel ("sdpa") in transformers' ALL_ATTENTION_FUNCTIONS with the all-to-all wrapper. Consecutive sp
  ranks are the cp dim of our mesh (dp_replicate, dp_shard, cp, tp): cp is inside dp_shard, tp is 1
  under DeepSpeed sp (emit/deepspeed.py refuses tp × cp there), so the groups agree (checked).
- the mpu goes to `deepspeed.initialize(mpu=...)`: ZeRO partitions over all ranks (dp × sp) and reduces
  gradients over them. What it divides by differs by path (`loss_scale_for_sp`; the loop scales the
  token-loss sum by grad_reduce = dp × sp over the tokens, a mean over all ranks, runtime/engines.py):
  ZeRO-1/2 divide by dp only (stage_1_and_2.py `average_tensor`, `allreduce_bucket`:
  `div_(world / sequence_parallel_size)`), i.e. they SUM over the sp ranks of a sequence: the engine
  multiplies the loss by 1/sp. ZeRO-3 with `reduce_scatter: true` (its default, and what we emit) goes
  through stage3.py `__avg_scatter_grads` -> comm/coalesced_collectives.py `reduce_scatter_coalesced`,
  which divides by the whole group (`div_(world_sz)`, no sp term): a mean over dp × sp, like FSDP2, so
  factor 1. ZeRO-3 with `reduce_scatter: false` takes the sp-corrected all-reduce only for buckets up to
  reduce_bucket_size (`__avg_scatter_contiguous_grads`) and the mean otherwise: refused.
  Measured (tests/runtime/test_ds_sequence_parallel.py, plain SGD without clipping, which shows any
  factor): without the stage-3 case, ZeRO-3 sp 2 reported half the gradient norm of the 1-D run.
- NOT its `UlyssesSPDataLoaderAdapter`: it makes every rank's loader draw its own sample and then the sp
  ranks take the samples in turn (one sample per sp rank per `sp` iterations: "SP over DP"), which changes
  which samples form a step and the accumulation count. Our sampler gives each dp rank its samples and
  the sp peers the same ones; `context_parallel.cp_slice` then slices exactly as the adapter does (labels
  padded with -100 and shifted left over the full sequence, then every tensor cut into sp slices).
- eval: `disable_in_eval=False`: the loop slices eval batches per cp rank as in training (worker.py
  `cp_view`), so attention must stay sequence parallel in eval mode too.

ALST runs on CPU gloo here (DeepSpeed 0.19.8, torch 2.13, transformers 5.23): its exchange is the
`deepspeed::dim_zero_all_to_all` custom op over `dist.all_to_all_single` (deepspeed/sequence/layer.py),
which gloo implements; tests/runtime/test_ds_sequence_parallel.py runs ZeRO-2 and ZeRO-3 with it.

Process-wide state it leaves (undone by `teardown`, so a later scenario in the same process runs plain):
the "sdpa" override in ALL_ATTENTION_FUNCTIONS' local mapping, parallel_state_sp's groups, and
deepspeed.utils.groups.mpu.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

SEQUENCE_PARALLEL_SIZE = "sequence_parallel_size"   # the ds_config key (emit/deepspeed.py)
MICRO_BATCH = "train_micro_batch_size_per_gpu"


def sp_size(ds_config: dict) -> int:
    """The config's sequence_parallel_size (1 when absent)."""
    return int(ds_config.get(SEQUENCE_PARALLEL_SIZE, 1) or 1)


def reduce_scatter(ds_config: dict) -> bool:
    """zero_optimization.reduce_scatter as DeepSpeed reads it (default true, runtime/zero/config.py)."""
    return bool(ds_config.get("zero_optimization", {}).get("reduce_scatter", True))


def loss_scale_for_sp(sp: int, zero_stage: int, reduce_scatter: bool) -> float:
    """Factor on the loop's loss scale so that DeepSpeed's gradient reduction over dp × sp ranks is a
    mean, as for the other engines (module doc: ZeRO-1/2 sum over sp, ZeRO-3's reduce-scatter averages)."""
    if sp == 1:
        return 1.0
    if zero_stage == 3:
        if not reduce_scatter:
            raise ValueError(f"zero_optimization.reduce_scatter false with ZeRO-3 and sequence_parallel_size {sp}: "
                             "DeepSpeed 0.19.8 then averages some gradient buckets over sp and sums others; "
                             "remove the key (default true)")
        return 1.0
    return 1.0 / sp


def setup_alst(model: nn.Module, ds_config: dict):
    """Register ALST for `model` and return its mpu (pass to deepspeed.initialize); None when sp is 1.
    deepspeed.comm must be initialised (dist.init_deepspeed_comm) and every rank must call this."""
    sp = sp_size(ds_config)
    if sp == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from shardtrain.runtime.packed_attention import PACKED_ATTENTION
    kernel = getattr(model.config, "_attn_implementation", None)
    # PACKED_ATTENTION (runtime/packed_attention.py, sdpa or flash inside): ALST hands it the gathered
    # position ids, so packed documents stay apart on the full sequence
    if kernel not in ("sdpa", PACKED_ATTENTION) and not str(kernel).startswith("flash_attention"):
        raise ValueError(f"train.attention {kernel!r} cannot run DeepSpeed Ulysses (sequence_parallel_size {sp}): "
                         "it needs a kernel that masks causally without a [s, s] mask; set train.attention: sdpa")
    from shardtrain.runtime.context_parallel import attention_modules
    windowed = [m.layer_idx for m in attention_modules(model) if getattr(m, "sliding_window", None)]
    if windowed and kernel == "sdpa":  # ALST drops the mask, where sdpa's sliding window lives
        raise ValueError(f"layers {windowed} use sliding-window attention, which DeepSpeed Ulysses with sdpa drops "
                         "(it discards the mask); use train.attention: flash or parallel.cp: 1")
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=kernel, sequence_parallel_size=sp,
        micro_batch_size=int(ds_config[MICRO_BATCH]), seq_length_is_variable=True, disable_in_eval=False)
    rank = dist.get_rank()
    want = list(range(rank - rank % sp, rank - rank % sp + sp))
    got = dist.get_process_group_ranks(mpu.get_sequence_parallel_group())
    if got != want:  # never expected: our mesh puts cp inside dp_shard, ALST groups consecutive ranks
        raise RuntimeError(f"DeepSpeed's sequence parallel group of rank {rank} is {got}, not the mesh's cp group {want}")
    return mpu


def teardown(kernel: str = "sdpa") -> None:
    """Undo setup_alst's process-wide state (module doc); safe to call when nothing was set up."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from shardtrain.runtime.packed_attention import PACKED_ATTENTION
    for name in dict.fromkeys((kernel, PACKED_ATTENTION)):
        if getattr(ALL_ATTENTION_FUNCTIONS._local_mapping.get(name), "__name__", "") == "uattn_wrapper":
            del ALL_ATTENTION_FUNCTIONS[name]   # ALST's wrapper (ulysses_sp.py register_with_transformers)
    import sys
    sp_state = sys.modules.get("deepspeed.runtime.sequence_parallel.parallel_state_sp")
    if sp_state is not None:
        sp_state._release_sequence_parallel_groups()
    from deepspeed.utils import groups
    groups.mpu = None
