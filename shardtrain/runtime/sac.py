"""Op-level selective activation checkpointing (`train.grad_ckpt: op`, issue 19 point 2): every decoder
layer under non-reentrant checkpoint whose `context_fn` saves the outputs of the expensive ops and
recomputes the rest — torchtitan's `op` policy.

Source: pytorch/torchtitan commit dfb1a6ad9b7025f8b776392e35c84c3047ad04e3 (2026-03-04, the last before
the policy was centralised in 114151ad), torchtitan/distributed/activation_checkpoint.py `_apply_op_sac`
with the save list of torchtitan/models/llama3/parallelize.py `_op_sac_save_list`:
- a CUDA→CPU `_to_copy` is always saved;
- mm (and aten.linear, where a backend keeps it whole) is counted per layer forward, separately for the
  forward and the recompute; its output is saved on odd counts (1st, 3rd, …) and recomputed on even
  ones ("saves output of all compute ops, except every second mm");
- the other ops of the save list are always saved: the SDPA kernels (flash, efficient, cudnn, math,
  fused-overrideable), `_c10d_functional.reduce_scatter_tensor`, `max` (low-precision scaling), flex
  attention; everything else is recomputed.
Two deliberate differences, both for cases torchtitan never meets:
- `aten._scaled_dot_product_flash_attention_for_cpu` is in the save list: it is what SDPA dispatches to
  on CPU (torchtitan runs on CUDA only), so the CPU runs save attention as the GPU runs do.
- ops run under no_grad (the tiled MLP's forward tiles, runtime/tiled_mlp.py) are neither saved nor
  counted: autograd saves nothing from them, so caching them only holds the intermediates tiling
  exists to drop. Without a tiled MLP no op of a training forward runs under no_grad.
torchtitan's `per_op_sac_force_recompute_mm_shapes_by_fqns` (empty by default) is not offered.
"""
from __future__ import annotations

from collections import defaultdict

import torch


def _op(path: str):
    """`torch.ops` path -> op overload, None when this torch has no such op."""
    obj = torch.ops
    try:
        for part in path.split("."):
            obj = getattr(obj, part)
    except (AttributeError, RuntimeError):
        return None
    return obj


MM_OPS = tuple(op for op in (_op("aten.mm.default"), _op("aten.linear.default")) if op is not None)

SAVE_OPS = frozenset(op for op in (
    *MM_OPS,
    _op("aten._scaled_dot_product_efficient_attention.default"),
    _op("aten._scaled_dot_product_flash_attention.default"),
    _op("aten._scaled_dot_product_cudnn_attention.default"),
    _op("aten._scaled_dot_product_attention_math.default"),
    _op("aten._scaled_dot_product_fused_attention_overrideable.default"),
    _op("aten._scaled_dot_product_flash_attention_for_cpu.default"),  # ours: SDPA's CPU kernel
    _op("_c10d_functional.reduce_scatter_tensor.default"),
    _op("aten.max.default"),
    getattr(torch._higher_order_ops, "flex_attention", None),
) if op is not None)


def op_policy(meta: dict):
    """torchtitan's `_custom_policy` over one layer forward's counters `meta` (see the module docstring)."""
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, func, *args, **kwargs):
        if (func == torch.ops.aten._to_copy.default and "cuda" in str(args[0].device)
                and "device" in kwargs and str(kwargs["device"]) == "cpu"):
            return CheckpointPolicy.MUST_SAVE
        if not torch.is_grad_enabled():
            return CheckpointPolicy.PREFER_RECOMPUTE
        key = "recompute_mm_count" if ctx.is_recompute else "forward_mm_count"
        if func in MM_OPS:
            meta[key] += 1
        to_save = func in SAVE_OPS and not (func in MM_OPS and meta[key] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if to_save else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def op_sac_context_fn():
    """The `context_fn` of torch.utils.checkpoint: fresh counters per checkpointed call (one layer)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(op_policy(defaultdict(int)))


def checkpoint_kwargs(op_level: bool) -> dict:
    """The keyword arguments HF's `activation_checkpointing_enable` passes to torch's checkpoint."""
    kw = {"use_reentrant": False}
    if op_level:
        kw["context_fn"] = op_sac_context_fn
    return kw
