"""Gathered (unsharded) parameter bytes: FSDP2 units and DeepSpeed ZeRO-3's live gathered params,
used by the phase model (compiler/phases.py)."""
from __future__ import annotations

import math

from shardtrain.compiler.inventory import TensorGroup
from shardtrain.compiler.memo import by_identity
from shardtrain.compiler.memory import ZeroBuckets, frozen_weight_bytes, zero3_window_bytes
from shardtrain.compiler.phase_inputs import PhaseInputs
from shardtrain.compiler.specs import Method, OffloadDevice, Precision

ROOT_GROUPS = {"embed_tokens": 1, "lm_head": 1, "norm": 1}
"""Tensor groups of the root unit (FSDP2's root module; not inside a decoder layer)."""


def zero3_gathered(x: PhaseInputs) -> tuple[int, int, int]:
    """ZeRO-3 gathered bytes: (the prefetch window memory.py puts in ms.buffers, the params still
    gathered after the forward, every non-persistent param gathered).

    partitioned_param_coordinator.py __params_to_release (called after each module's use) keeps a
    param when it reappears in the module trace before `stage3_max_reuse_distance` numel of modules
    have been traversed. Between a decoder layer's forward use and its next use lie the layers above
    it (forward, then backward; a checkpointed layer twice in the backward: recompute + backward) and
    the head (forward and backward); the embedding's next use is its backward at the very end (tied:
    the lm_head, right after the forward). Persistent params (numel <= threshold) are in `params`."""
    m, L = x.model, x.model.num_layers
    buckets = ZeroBuckets.for_model(m)
    window = zero3_window_bytes(m, x.groups, x.method, x.precision, buckets, tp=x.tp)
    if x.shard_size == 1 and x.strategy.offload_params is OffloadDevice.NONE:
        # one rank: partition_parameters.py all_gather_coalesced -> _no_gather_coalesced sets
        # `param.data = param.ds_tensor.data.to(device)`, a no-op on the same device: the "gathered"
        # param aliases its partition, nothing is allocated (measured: ZeRO-3 full, 1 rank)
        return window, 0, 0
    layer_b, emb_b, head_b = _zero3_units(x.groups, x.method, x.precision, buckets.param_persistence_threshold, L)
    layer_n = m.per_layer_params
    head_n = m.lm_head_params
    per_layer_uses = 1 + 1 + x.grad_ckpt_layers / L     # forward + backward (+ recompute)
    held = head_b                                       # reused immediately by its backward
    for i in range(1, L + 1):                           # layer i of L (1 = bottom)
        if (L - i) * layer_n * per_layer_uses + 2 * head_n < buckets.max_reuse_distance:
            held += layer_b
    emb_dist = 0 if m.tie_word_embeddings else L * layer_n * per_layer_uses + 2 * head_n
    if emb_dist < buckets.max_reuse_distance:
        held += emb_b
    return window, held, head_b + L * layer_b + emb_b


@by_identity
def _zero3_units(groups: tuple[TensorGroup, ...], method: Method, precision: Precision, thr: int,
                 L: int) -> tuple[int, int, int]:
    """Gathered bytes of non-persistent params (numel > thr): one layer, the embedding, lm_head + norm
    (per inventory, not per candidate: memo.by_identity)."""
    def unit_bytes(how_many) -> int:
        return gathered_bytes(groups, 1, method, precision, lambda g: how_many(g) if g.numel > thr else 0)[0]

    return (unit_bytes(lambda g: per_layer_count(g, L)),
            unit_bytes(lambda g: g.count if g.name == "embed_tokens" else 0),
            unit_bytes(lambda g: g.count if g.name in ("lm_head", "norm") else 0))


def per_layer_count(g: TensorGroup, L: int) -> float:
    """Tensors of this group in ONE decoder layer (0 for the root's groups)."""
    return g.count / L if g.count % L == 0 and g.count >= L and g.name not in ROOT_GROUPS else 0


def gathered_bytes(groups: tuple[TensorGroup, ...], N: int, method: Method, precision: Precision,
              how_many) -> tuple[int, int]:
    """(all-gathered bytes, trainable padded elements) of `how_many(g)` tensors per group: trainable
    params gather in param_dtype, frozen ones in their storage (16-bit; QLoRA NF4)."""
    nbytes = 0.0
    trainable = 0.0
    for g in groups:
        k = how_many(g)
        if not k:
            continue
        elems = N * math.ceil(g.shape[0] / N) * (g.numel // g.shape[0])
        if g.trainable:
            nbytes += k * elems * precision.param_bytes
            trainable += k * elems
        else:
            nbytes += k * elems * frozen_weight_bytes((g,), method, precision) / g.total
    return int(nbytes), int(trainable)
