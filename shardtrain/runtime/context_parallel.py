"""Context parallel (cp) on the ranks: DeepSpeed-Ulysses attention (Jacobs et al. 2023,
arXiv:2309.14509) behind transformers' AttentionInterface, and the per-cp-rank token slice.

Each of the cp ranks of a sequence holds s/cp of its tokens through the whole model (embeddings, MLP,
norms, logits, loss: all per token). Only attention needs the full sequence; Ulysses trades the
sharded dimension around it with two all-to-alls over the cp group:

    q, k, v  [b, heads, s/cp, d]  --all_to_all-->  [b, heads/cp, s, d]   (every token, a slice of heads)
    the model's own kernel (sdpa / flash), causal over the full sequence
    out      [b, s, heads/cp, d]  --all_to_all-->  [b, s/cp, heads, d]   (back to the token slice)

Both are one `all_to_all_single` over dim 0 (the peer), in an autograd Function whose backward is the
inverse all-to-all (the exchange is a permutation: its adjoint is its inverse). Nothing in the model's
code is patched: `install_ulysses` registers the function under its own name in
`transformers.AttentionInterface` (and a mask function returning None in `AttentionMaskInterface`, so
no [s/cp, s/cp] mask is built for the local length; the kernel's `is_causal` masks the full sequence)
and points the model config's `_attn_implementation` at it; the previous implementation is the inner
kernel. Only the attention modules of a model that was given a cp group take this path
(`_GROUPS`); a module without one (a second model in the process) runs the inner kernel as before.
Evaluation runs the same path: the loop slices eval batches per cp rank too (worker.py `cp_view`), since
a sequence that needs cp to train does not fit one rank in eval either.

Why right padding is fine and masks are dropped: the data collator pads on the right and labels pads
-100 (runtime/data.py `collate`); under a causal kernel a real token never attends to a later pad, so
the result on labelled tokens equals the masked one. Packed documents (position ids restarting per
document, runtime/data.py) stay apart when the inner kernel is runtime/packed_attention.py (what
runtime/build.py installs for sdpa/flash models): it gets the cp group's gathered position ids.

KV heads (GQA): with kv_heads % cp == 0 each rank takes kv_heads/cp kv heads, exactly the ones its
query heads use (contiguous blocks). Otherwise each kv head is repeated f = cp / gcd(kv_heads, cp)
times (DeepSpeed's ALST does the same for kv_heads < cp, ulysses_sp.py `kv_replication_factor`), which
keeps the query-to-kv-head map and makes the count divisible (heads % cp == 0 is required, so heads is
a multiple of lcm(kv_heads, cp)). The replicated gradients sum back through repeat_interleave.

Loss over cp: position t predicts token t+1 of the FULL sequence, so labels are shifted before
slicing (`cp_slice`: the last token of slice r predicts the first token of slice r+1) and the loss
of a slice is `shifted_ce_sum(logits, shift_labels)` (no second shift). Each token is labelled on
exactly one cp rank, so summing token losses and counts over the cp group (`cp_token_count`) counts
every token once.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist
from torch import nn

from shardtrain.runtime import packed_attention
from shardtrain.runtime.packed_attention import PACKED_ATTENTION, gather_positions

IGNORE_INDEX = -100
#: the name our attention function is registered under in transformers' AttentionInterface
ULYSSES_ATTENTION = "shardtrain_ulysses"
#: inner kernels that mask causally by themselves when given no mask (eager and flex need a mask)
INNER_KERNELS = (*packed_attention.INNER_KERNELS, PACKED_ATTENTION)

# attention module -> (cp process group, inner kernel name); weak so a freed model leaves nothing
_GROUPS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------- data slice
def cp_slice(input_ids: torch.Tensor, labels: torch.Tensor, cp_rank: int, cp: int, *,
             position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """This cp rank's token slice of a micro-batch: `input_ids`, `position_ids` (global positions, so
    RoPE is right) and `shift_labels` (labels shifted left by one over the full sequence, -100 at the
    last position, then sliced), each [b, s/cp]."""
    s = input_ids.shape[-1]
    if s % cp:
        raise ValueError(f"sequence length {s} is not divisible by cp {cp}: pad the micro-batch to a multiple "
                         f"of cp (or set parallel.cp to a divisor of {s})")
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank {cp_rank} is outside 0..{cp - 1}")
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device).expand(input_ids.shape[0], s)
    shift = nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    lo, hi = cp_rank * (s // cp), (cp_rank + 1) * (s // cp)
    return {"input_ids": input_ids[..., lo:hi].contiguous(),
            "position_ids": position_ids[..., lo:hi].contiguous(),
            "shift_labels": shift[..., lo:hi].contiguous()}


def shifted_ce_sum(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of logits [b, s_local, V] against labels already shifted (cp_slice)."""
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), shift_labels.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")


def cp_token_count(shift_labels: torch.Tensor, cp_group) -> int:
    """Labelled tokens of the whole sequences this cp group shares (each counted once: the slices
    partition them); a collective over cp_group."""
    n = (shift_labels != IGNORE_INDEX).sum().to(torch.int64).reshape(1)
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(n, group=cp_group)
    return int(n.item())


# ------------------------------------------------------------------------------------- all-to-all
def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single over dim 0 (block i goes to peer i, block i received from peer i)."""
    x = x.contiguous()                 # before empty_like: it would copy a permuted layout's strides
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[b, h, s/cp, d] -> [b, h/cp, s, d]: send head block j to peer j, receive sequence slice i from peer i."""
    b, h, sl, d = x.shape
    x = x.reshape(b, cp, h // cp, sl, d).permute(1, 0, 2, 3, 4)        # [cp(head block), b, h/cp, sl, d]
    y = _exchange(x, group)                                             # [cp(seq slice), b, h/cp, sl, d]
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * sl, d)


def _head_to_seq(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[b, h/cp, s, d] -> [b, h, s/cp, d]: the inverse of _seq_to_head."""
    b, hl, s, d = x.shape
    x = x.reshape(b, hl, cp, s // cp, d).permute(2, 0, 1, 3, 4)         # [cp(seq slice), b, h/cp, sl, d]
    y = _exchange(x, group)                                             # [cp(head block), b, h/cp, sl, d]
    return y.permute(1, 0, 2, 3, 4).reshape(b, cp * hl, s // cp, d)


class SeqToHead(torch.autograd.Function):
    """Differentiable _seq_to_head: backward is the inverse all-to-all (_head_to_seq)."""

    @staticmethod
    def forward(ctx, x, group, cp):
        ctx.group, ctx.cp = group, cp
        return _seq_to_head(x, group, cp)

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad, ctx.group, ctx.cp), None, None


class HeadToSeq(torch.autograd.Function):
    """Differentiable _head_to_seq: backward is _seq_to_head."""

    @staticmethod
    def forward(ctx, x, group, cp):
        ctx.group, ctx.cp = group, cp
        return _head_to_seq(x, group, cp)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad, ctx.group, ctx.cp), None, None


def kv_replication(kv_heads: int, cp: int) -> int:
    """How many times each kv head is repeated so that the kv heads split evenly over cp (module doc)."""
    return 1 if kv_heads % cp == 0 else cp // math.gcd(kv_heads, cp)


# ------------------------------------------------------------------------------------- attention
def ulysses_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, **kwargs):
    """AttentionInterface function: q/k/v [b, heads, s/cp, d] of this rank's tokens in, [b, s/cp, heads, d]
    out (what the model's o_proj reshapes), attention over the full sequence of the cp group."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    group, inner_name = _GROUPS.get(module, (None, "sdpa"))
    inner = ALL_ATTENTION_FUNCTIONS[inner_name]
    if group is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    cp = dist.get_world_size(group)
    f = kv_replication(key.shape[1], cp)
    if f > 1:
        key, value = key.repeat_interleave(f, dim=1), value.repeat_interleave(f, dim=1)
    q, k, v = (SeqToHead.apply(t, group, cp) for t in (query, key, value))
    pos = kwargs.pop("position_ids", None)   # the local slice's positions (RoPE is applied already)
    if inner_name == PACKED_ATTENTION:       # its document segments: the full sequence's positions
        kwargs["position_ids"] = gather_positions(pos, group)
    kwargs["is_causal"] = True
    saved = getattr(module, "num_key_value_groups", None)
    try:
        if saved is not None:  # the local head counts decide the grouping the inner kernel applies
            module.num_key_value_groups = q.shape[1] // k.shape[1]
        out, _ = inner(module, q, k, v, None, **kwargs)                   # [b, s, h/cp, d]
    finally:
        if saved is not None:
            module.num_key_value_groups = saved
    out = HeadToSeq.apply(out.transpose(1, 2), group, cp)               # [b, h, s/cp, d]
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Mask function for our name: no mask at the local length (the kernel is causal over the full one)."""
    return None


def register_ulysses() -> None:
    """Register ULYSSES_ATTENTION with transformers (idempotent, process-wide; harmless to other models)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(ULYSSES_ATTENTION, ulysses_attention)
    AttentionMaskInterface.register(ULYSSES_ATTENTION, _no_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of an HF decoder (under peft / DDP / FSDP2 / DeepSpeed wrappers)."""
    return [m for m in model.modules()
            if all(hasattr(m, a) for a in ("layer_idx", "is_causal", "head_dim", "config", "num_key_value_groups"))]


def check_ulysses(mods: list[nn.Module], cp: int, model_name: str = "model") -> list[str]:
    """The inner kernel of each attention module; one-line ValueError when Ulysses cannot run them."""
    if not mods:
        raise ValueError(f"{model_name}: no attention module with layer_idx/is_causal/head_dim found; context "
                         "parallel (Ulysses) supports HF decoder models that use transformers' AttentionInterface")
    heads = mods[0].config.num_attention_heads  # any kv head count works (kv_replication)
    if heads % cp:
        raise ValueError(f"num_attention_heads {heads} is not divisible by cp {cp}: Ulysses splits heads over the "
                         f"cp ranks; set parallel.cp to a divisor of {heads}")
    inners = []
    for m in mods:
        if getattr(m, "sliding_window", None):
            raise ValueError(f"layer {m.layer_idx} uses sliding-window attention ({m.sliding_window} tokens): Ulysses "
                             "here masks only causally; train this model without context parallel (parallel.cp: 1)")
        inner = m.config._attn_implementation
        if inner == ULYSSES_ATTENTION:
            inner = _GROUPS.get(m, (None, "sdpa"))[1]
        if inner not in INNER_KERNELS:
            raise ValueError(f"attention implementation {inner!r} cannot run under Ulysses (it needs a [s, s] mask); "
                             f"load the model with attn_implementation one of {', '.join(INNER_KERNELS)}")
        inners.append(inner)
    return inners


def install_ulysses(model: nn.Module, cp_group) -> None:
    """Route `model`'s attention through Ulysses over `cp_group` (module doc). Refuses, in one line, a
    model whose heads do not split over cp or whose kernel needs an explicit mask (check_ulysses)."""
    mods = attention_modules(model)
    inners = check_ulysses(mods, dist.get_world_size(cp_group), type(model).__name__)
    for m, inner in zip(mods, inners):
        _GROUPS[m] = (cp_group, inner)
    register_ulysses()
    for c in {id(m.config): m.config for m in mods}.values():
        c._attn_implementation = ULYSSES_ATTENTION


def uninstall_ulysses(model: nn.Module) -> None:
    """Undo install_ulysses (the model's attention runs its inner kernel on the local tokens again)."""
    for m in attention_modules(model):
        entry = _GROUPS.pop(m, None)
        if entry is not None and m.config._attn_implementation == ULYSSES_ATTENTION:
            m.config._attn_implementation = entry[1]
