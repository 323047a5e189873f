"""Ring context parallel (cp_mode ring) on the FSDP2 engine, CUDA only: torch's `context_parallel`
(torch/distributed/tensor/experimental/_context_parallel/_attention.py, torch 2.13) around each
micro-step's forward and backward, as torchtitan's train step and accelerate 1.15's
`Accelerator.maybe_context_parallel` do.

What torch does inside the context: it shards the listed buffers along their sequence dim in place
(each cp rank keeps s/cp tokens) and patches `torch.nn.functional.scaled_dot_product_attention` so that
each call passes the K/V blocks around the cp ranks (ring attention, Liu et al. 2023, arXiv:2310.01889)
and merges the partial softmaxes by their log-sum-exp. Its sharding rules cover only the CUDA flash,
memory-efficient and cuDNN SDPA kernels (`_sdpa_handler`: "CP only supports flash attention and memory
efficient attention"), so ring cannot run on CPU (refused in one line: launcher/preflight.py, build.py).

Load balancing: under a causal mask the last tokens attend to the most keys, so torch's
`_HeadTailLoadBalancer` splits the sequence into 2·cp chunks and gives rank r chunks r and 2·cp-1-r.
It only does so when s % (2·cp) == 0 (otherwise it silently falls back to contiguous slices, slower on
the last rank): `ring_view` right-pads each micro-batch to a multiple of 2·cp (pads are labelled -100
and, under a causal kernel, never attended to by a real token), and `check_ring_len` refuses any other
length in one line. The balancer reorders tokens, which is why every per-token buffer (input ids,
position ids, labels) goes through the same `context_parallel` call: they are permuted alike, so each
rank's logits still line up with its labels and its positions (RoPE) stay global.

Labels: position t predicts token t+1 of the FULL sequence, so labels are shifted before sharding
(context_parallel.cp_slice with one slice: `shift_labels`, -100 at the last position); the loss of a
shard is `shifted_ce_sum` (no second shift), each labelled token lives on exactly one cp rank, and the
worker's token count takes each sequence once (mesh.MeshCoords.counts_tokens), as on the Ulysses path.

Attention: the model must load with attn_implementation sdpa (eager builds an [s, s] mask torch cannot
shard; flash_attention_* bypass scaled_dot_product_attention, so no ring would run). `install_ring`
points the model at `ring_attention`, registered in transformers' AttentionInterface: plain
`scaled_dot_product_attention(is_causal=True)` with no mask (its mask function returns None: the
load-balanced position ids are not monotonic, and transformers would read them as packed sequences and
build a mask) and kv heads repeated to the query heads (GQA without `enable_gqa`, which torch's CP
handler does not pass through).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from shardtrain.runtime.context_parallel import IGNORE_INDEX, attention_modules, cp_slice

#: the name our attention function is registered under in transformers' AttentionInterface
RING_ATTENTION = "shardtrain_ring"
#: the one kernel the model may load with (module doc)
RING_INNER = "sdpa"


# ------------------------------------------------------------------------------------- buffers
def ring_multiple(cp: int) -> int:
    """The sequence length must be a multiple of this: two load-balanced chunks per cp rank."""
    return 2 * cp


def check_ring_len(seq_len: int, cp: int) -> None:
    """One-line ValueError unless torch's head-tail load balancer applies to `seq_len` (module doc)."""
    m = ring_multiple(cp)
    if seq_len % m:
        raise ValueError(f"sequence length {seq_len} is not divisible by 2·cp = {m}: ring cp gives each rank two "
                         f"load-balanced chunks; pad the micro-batch to a multiple of {m} (or set parallel.cp to "
                         f"a cp with {seq_len} % (2·cp) == 0)")


def _pad_right(t: torch.Tensor, n: int, value: int) -> torch.Tensor:
    return nn.functional.pad(t, (0, n), value=value) if n else t


def ring_view(batch: dict, labels: torch.Tensor, cp: int) -> tuple[dict, torch.Tensor, bool]:
    """(batch, shift_labels, shifted=True) of the FULL sequences, for `ring_shard` to split: input ids
    right-padded to a multiple of 2·cp, global position ids, labels shifted over the full sequence before
    any sharding (cp_slice's logic), the padding mask dropped (right padding under a causal kernel
    changes no labelled token). Fresh tensors: context_parallel resizes them in place."""
    ids = batch["input_ids"]
    s = ids.shape[-1]
    pad = -s % ring_multiple(cp)
    pos = batch.get("position_ids")
    if pos is not None:   # packed documents: the ring attends across them, so positions run on (packed_attention.py)
        from shardtrain.runtime.packed_attention import continuous_positions
        pos = continuous_positions(pos)
    if pos is None:
        pos = torch.arange(s, device=ids.device).expand(ids.shape[0], s)
    full = cp_slice(ids, labels, 0, 1, position_ids=pos)  # one slice = the whole sequence, labels shifted
    ids = _pad_right(full["input_ids"], pad, 0)           # pad token value is never attended to nor labelled
    shift = _pad_right(full["shift_labels"], pad, IGNORE_INDEX)
    last = full["position_ids"][..., -1:]
    pos = torch.cat([full["position_ids"], last + torch.arange(1, pad + 1, device=ids.device)], dim=-1) if pad \
        else full["position_ids"]
    check_ring_len(ids.shape[-1], cp)
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "position_ids", "attention_mask")}
    return {**rest, "input_ids": ids.clone(), "position_ids": pos.expand_as(ids).clone()}, shift.clone(), True


@contextlib.contextmanager
def ring_shard(cp_mesh, batch: dict, shift_labels: torch.Tensor):
    """torch's context_parallel over `cp_mesh` (a 1-D DeviceMesh): shards batch["input_ids"],
    batch["position_ids"] and `shift_labels` (from ring_view) in place along dim 1, load-balanced, and
    runs every scaled_dot_product_attention inside as ring attention. The buffers are not restored
    (the caller counts the local labels after the context, e.g. in evaluation)."""
    from torch.distributed.tensor.experimental import context_parallel
    bufs = [batch["input_ids"], batch["position_ids"], shift_labels]
    check_ring_len(bufs[0].shape[1], cp_mesh.size())
    with context_parallel(cp_mesh, buffers=bufs, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(bufs)):
        yield


# ------------------------------------------------------------------------------------- attention
def ring_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask, **kwargs):
    """AttentionInterface function: q/k/v [b, heads, s/cp, d] in, [b, s/cp, heads, d] out. Causal SDPA
    with no mask, looked up at call time so torch's context_parallel patch (the ring) applies."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    dropout = kwargs.get("dropout", 0.0)  # the model passes 0.0 outside training
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                                           scale=kwargs.get("scaling"))
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Mask function for our name: none (the kernel is causal; the ring masks across blocks)."""
    return None


def register_ring() -> None:
    """Register RING_ATTENTION with transformers (idempotent, process-wide; harmless to other models)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(RING_ATTENTION, ring_attention)
    AttentionMaskInterface.register(RING_ATTENTION, _no_mask)


def sliding_window(m: nn.Module) -> int | None:
    """The layer's attention window: a module attribute (Gemma, Qwen3), else the config's (Mistral reads
    config.sliding_window at forward time; with layer_types only the "sliding_attention" layers)."""
    if getattr(m, "sliding_window", None):
        return m.sliding_window
    c = m.config
    types = getattr(c, "layer_types", None)
    if types is not None and types[m.layer_idx] != "sliding_attention":
        return None
    return getattr(c, "sliding_window", None)


def check_ring(mods: list[nn.Module], model_name: str = "model") -> None:
    """One-line ValueError when ring attention cannot run these attention modules."""
    if not mods:
        raise ValueError(f"{model_name}: no attention module with layer_idx/is_causal/head_dim found; ring context "
                         "parallel supports HF decoder models that use transformers' AttentionInterface")
    for m in mods:
        if window := sliding_window(m):
            raise ValueError(f"layer {m.layer_idx} uses sliding-window attention ({window} tokens): ring cp masks "
                             "only causally; train this model with parallel.cp: 1")
        inner = m.config._attn_implementation
        if inner not in (RING_INNER, RING_ATTENTION):
            raise ValueError(f"attention implementation {inner!r} cannot run under ring cp (torch's context_parallel "
                             "patches scaled_dot_product_attention only); set train.attention: sdpa")


def install_ring(model: nn.Module) -> None:
    """Route `model`'s attention through `ring_attention` (refuses in one line what check_ring refuses)."""
    mods = attention_modules(model)
    check_ring(mods, type(model).__name__)
    register_ring()
    for c in {id(m.config): m.config for m in mods}.values():
        c._attn_implementation = RING_ATTENTION


class RingCP:
    """What the worker needs on the ring branch: the cp mesh and the micro-batch view / shard context."""

    def __init__(self, cp_mesh):
        self.mesh, self.cp = cp_mesh, cp_mesh.size()

    def view(self, batch: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor, bool]:
        return ring_view(batch, labels, self.cp)

    def shard(self, batch: dict, shift_labels: torch.Tensor):
        return ring_shard(self.mesh, batch, shift_labels)


def refuse_ring_on(device_type: str) -> None:
    """The one-line refusal of ring cp off CUDA (the preflight says it first)."""
    if device_type != "cuda":
        raise ValueError(f"parallel.cp_mode: ring cannot run on {device_type}: torch's context_parallel has no "
                         f"{device_type.upper()} kernel (its sharding rules cover CUDA flash / memory-efficient "
                         "attention only); set parallel.cp_mode: ulysses")
