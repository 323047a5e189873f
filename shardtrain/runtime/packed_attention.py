"""Attention that stays inside each packed document, with no O(seq²) mask anywhere (issue 20 point 4).

With `data.packing` a sample is several documents back to back; their position ids restart at 0 at
every document (runtime/data.py `pack_documents`). A new segment starts wherever position_ids[t] !=
position_ids[t-1] + 1 (the rule transformers' masking_utils.find_packed_sequence_indices uses; the flash
path's prepare_fa_kwargs_from_position_ids takes the positions equal to the minimum, 0 here: the
same boundaries because every segment starts at 0, a document cut by a block boundary included).

`install_packed` points the model's attention at `packed_attention`, registered in transformers'
AttentionInterface under PACKED_ATTENTION, with the model's own kernel as the inner one:
- sdpa (CPU and CUDA): one `scaled_dot_product_attention(is_causal=True)` per document segment
  (transformers' sdpa_attention_forward on q/k/v slices, no mask); exact, since a causal kernel over a
  segment is the block-diagonal causal mask, and O(seq) memory (the CPU flash kernel
  `_scaled_dot_product_flash_attention_for_cpu` keeps only the output and a logsumexp per query).
  Segments are read from the position ids once per forward (one host sync; cached for the other
  layers and the checkpointed recomputation, which pass the same tensor).
- flash_attention_2/3/4 (CUDA): transformers' own varlen path, which reads `position_ids` itself
  (modeling_flash_attention_utils._flash_attention_forward: `_is_packed_sequence`, batch size 1 only,
  so a micro-batch of b runs as b calls).

No mask is built: the name is NOT registered in AttentionMaskInterface, so transformers'
masking_utils._preprocess_mask_arguments exits early ("custom attention without equivalent mask
creation") and passes attention_mask=None; neither the packed-sequence mask (built from the position
ids, [b, 1, s, s] bool, and converted by SDPA to a float mask in EVERY layer, saved for backward) nor the
padding mask is made. Right padding (runtime/data.py `collate`: pads at the end, labelled -100) under
a causal kernel changes no labelled token, so the padding mask is not needed either.

Why the runtime installs it for every sdpa run, packed or not: under FakeTensorMode (`plan --trace`)
transformers' packed-sequence detection cannot read the position ids (`is_tracing` is true for fake
tensors) and assumes packing, so it builds the [b, 1, s, s] mask and every layer's SDPA converts it to
a bf16/fp32 float mask saved for backward: (1 + L·dtype bytes)·b·s² in the trace that the real runtime
never held (33 bytes per s² on llama-3.2-1b bf16, 16 layers). With this function both paths hold none.

Context parallel: Ulysses (runtime/context_parallel.py) gathers the position ids of the cp group and
hands the full sequence's to this function after its all-to-all; DeepSpeed's ALST gathers them itself
(ulysses_sp.py `UlyssesSPAttentionHF.forward`). Ring cp keeps its own causal kernel over the whole block
(documents are not separated there: torch's load balancer reorders tokens), so its view continues the
positions over the block (`continuous_positions`); labels still stop at every document boundary.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

#: the name the function is registered under in transformers' AttentionInterface
PACKED_ATTENTION = "shardtrain_packed"
#: inner kernels it can run (eager and flex need a mask: left alone)
INNER_KERNELS = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")

# attention module -> inner kernel name; weak so a freed model leaves nothing
_INNER: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
# the last position-id tensor read (weakly) and its segment starts: one host sync per forward
_LAST: dict = {}
# the last local position-id tensor gathered (weakly) and the cp group's full ones: one all_gather per forward
_GATHERED: dict = {}


def _once_per_tensor(memo: dict, t: torch.Tensor, compute):
    """`compute(t)`, reused while `t` is the same tensor, unmodified: the model passes one position-id
    tensor to every layer, and the checkpointed recomputation passes it again."""
    ref = memo.get("ref")
    if ref is not None and ref() is t and memo["version"] == t._version:
        return memo["value"]
    value = compute(t)
    memo.update(ref=weakref.ref(t), version=t._version, value=value)
    return value


def segment_starts(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row of [b, s] position ids: the indices where a document segment starts (0 always does)."""
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    new = torch.ones_like(pos, dtype=torch.bool)
    new[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return [torch.nonzero(row).flatten().tolist() for row in new.cpu()]


def _starts_cached(position_ids: torch.Tensor) -> list[list[int]]:
    return _once_per_tensor(_LAST, position_ids, segment_starts)


def _sdpa(module, q, k, v, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=kwargs.get("dropout", 0.0),
                                    scaling=kwargs.get("scaling"), is_causal=True)
    return out                                              # [b, s, heads, d]


def packed_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                starts: list[list[int]], kwargs: dict) -> torch.Tensor:
    """Causal SDPA per document segment: q [b, h, s, d], k/v [b, kv, s, d] -> [b, s, h, d]."""
    s = query.shape[2]
    if len(starts) == 1 or all(r == starts[0] for r in starts):   # every row cut alike: one loop
        rows = [(slice(None), starts[0])]
    else:
        rows = [(slice(i, i + 1), r) for i, r in enumerate(starts)]
    outs = []
    for rs, st in rows:
        bounds = list(zip(st, st[1:] + [s]))
        if len(bounds) == 1:
            outs.append(_sdpa(module, query[rs], key[rs], value[rs], kwargs))
            continue
        outs.append(torch.cat([_sdpa(module, query[rs, :, a:b], key[rs, :, a:b], value[rs, :, a:b], kwargs)
                               for a, b in bounds], dim=1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, **kwargs):
    """AttentionInterface function: q/k/v [b, heads, s, d] in, ([b, s, heads, d], None) out; attention within
    each document segment of `position_ids` (module doc). A mask handed in by a caller that built one
    anyway (a 4-D tensor) is honoured through the plain inner kernel."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    inner = _INNER.get(module, "sdpa")
    pos = kwargs.get("position_ids")
    if attention_mask is not None:
        return ALL_ATTENTION_FUNCTIONS[inner](module, query, key, value, attention_mask, **kwargs)
    if inner != "sdpa":   # transformers' flash varlen path reads position_ids itself (batch 1 per call)
        fn = ALL_ATTENTION_FUNCTIONS[inner]
        if pos is None or query.shape[0] == 1 or _is_fake(pos):
            return fn(module, query, key, value, None, **kwargs)
        if all(len(r) == 1 for r in _starts_cached(pos)):   # no row packed: one batched call
            return fn(module, query, key, value, None, **kwargs)
        pos = pos.expand(query.shape[0], -1)
        outs = [fn(module, query[i:i + 1], key[i:i + 1], value[i:i + 1], None, **{**kwargs, "position_ids": pos[i:i + 1]})[0]
                for i in range(query.shape[0])]
        return torch.cat(outs, dim=0), None
    if pos is None or query.shape[2] == 1 or _is_fake(pos):   # fake: plan --trace (sizes as one segment)
        return _sdpa(module, query, key, value, kwargs), None
    starts = _starts_cached(pos)          # read from the tensor the model passes every layer (cached)
    if len(starts) == 1 and query.shape[0] > 1:   # [1, s] positions shared by every row
        starts = starts * query.shape[0]
    return packed_sdpa(module, query, key, value, starts, kwargs), None


def _is_fake(t: torch.Tensor) -> bool:
    """A fake tensor, or any tensor under an active FakeTensorMode (no values to read segments from)."""
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t) or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def register_packed() -> None:
    """Register PACKED_ATTENTION with transformers (idempotent, process-wide; NOT as a mask function)."""
    from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def _windowed(m: nn.Module) -> bool:
    from shardtrain.runtime.ring_attention import sliding_window
    return bool(sliding_window(m))


def install_packed(model: nn.Module) -> bool:
    """Route `model`'s attention through `packed_attention` when every attention module's kernel is one of
    INNER_KERNELS and none uses a sliding window (whose band lives in the mask). Returns whether it did;
    otherwise the model keeps transformers' masks (eager builds its [s, s] scores anyway)."""
    from shardtrain.runtime.context_parallel import attention_modules
    mods = attention_modules(model)
    if not mods or any(_windowed(m) for m in mods):
        return False
    inners = [_INNER.get(m, m.config._attn_implementation) if m.config._attn_implementation == PACKED_ATTENTION
              else m.config._attn_implementation for m in mods]
    if any(i not in INNER_KERNELS for i in inners):
        return False
    register_packed()
    for m, inner in zip(mods, inners):
        _INNER[m] = inner
    for c in {id(m.config): m.config for m in mods}.values():
        c._attn_implementation = PACKED_ATTENTION
    return True


def inner_kernel(model: nn.Module) -> str | None:
    """The kernel packed_attention runs for `model` (None when it is not installed)."""
    from shardtrain.runtime.context_parallel import attention_modules
    for m in attention_modules(model):
        if m.config._attn_implementation == PACKED_ATTENTION:
            return _INNER.get(m, "sdpa")
    return None


def continuous_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Kernels that cannot keep documents apart (ring cp) attend across them: give each row one increasing
    run of positions from its first one (as packing did before per-document positions), so that RoPE's
    relative distances between documents stay true. Rows that are one run already come back unchanged."""
    if all(len(r) == 1 for r in segment_starts(position_ids)):
        return position_ids
    s = position_ids.shape[-1]
    return position_ids[..., :1] + torch.arange(s, device=position_ids.device)


def gather_positions(position_ids: torch.Tensor | None, group) -> torch.Tensor | None:
    """The full sequence's position ids [b, s] from each cp rank's slice [b, s/cp] (Ulysses: the inner
    kernel sees every token after the all-to-all). One all_gather of b·s/cp int64 per forward (cached)."""
    import torch.distributed as dist
    if position_ids is None or group is None or dist.get_world_size(group) == 1:
        return position_ids

    def gather(local: torch.Tensor) -> torch.Tensor:
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        return torch.cat(parts, dim=-1)
    return _once_per_tensor(_GATHERED, position_ids, gather)
