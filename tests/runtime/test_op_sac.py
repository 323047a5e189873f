"""Op-level selective activation checkpointing (`grad_ckpt: op`, runtime/sac.py: torchtitan's `op` policy)
in process on a tiny HF Llama: bitwise the losses and gradients of full checkpointing (LoRA with
dropout too: the recompute restores the RNG), the ops it saves in each layer (1st, 3rd, 5th, 7th mm and
the CPU SDPA kernel), and a measured peak between none and full (PyTorch's MemTracker, real mode)."""
from __future__ import annotations

import pytest
import torch

from savers_model import batch, build, step, tracked_peak
from shardtrain.compiler.specs import GradCkpt
from shardtrain.runtime import sac


@pytest.mark.parametrize("lora_dropout", [None, 0.1])
def test_bitwise_equal_to_full_checkpointing(lora_dropout):
    ref_loss, ref = step(build(ckpt=GradCkpt.FULL, lora_dropout=lora_dropout)[0])
    loss, got = step(build(ckpt=GradCkpt.OP, lora_dropout=lora_dropout)[0])
    assert loss == ref_loss
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def _saved_per_layer(monkeypatch, tiles: int = 1) -> list[list[tuple[str, int]]]:
    """(op name, output width) of every MUST_SAVE decision in each checkpointed layer's forward."""
    from torch.utils.checkpoint import CheckpointPolicy
    calls, made = [], []
    orig = sac.op_policy

    def recording(meta):
        policy, call = orig(meta), len(made)
        made.append(call)

        def rec(ctx, func, *args, **kwargs):
            out = policy(ctx, func, *args, **kwargs)
            if out is CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
                out0 = ctx.op_output[0] if isinstance(ctx.op_output, (tuple, list)) else ctx.op_output
                calls.append((call, func.__name__, tuple(out0.shape)))
            return out
        return rec
    monkeypatch.setattr(sac, "op_policy", recording)
    step(build(ckpt=GradCkpt.OP, tiles=tiles)[0], batch(b=1, s=8))
    layers = {}
    for key, name, shape in calls:
        layers.setdefault(key, []).append((name.removesuffix(".default"), shape[-1]))
    assert len(made) == 2 and len(layers) == 2   # one policy (fresh counters) per checkpointed layer forward
    return list(layers.values())


SDPA_CPU = "_scaled_dot_product_flash_attention_for_cpu"


def test_saves_every_second_mm_and_attention(monkeypatch):
    """Per layer forward of a Llama layer: q (1st mm, saved), k, v (3rd, saved), SDPA (saved), o,
    gate (5th, saved), up, down (7th, saved); the recompute's counter runs on its own."""
    for saved in _saved_per_layer(monkeypatch):
        # hidden 64, 2 kv heads of 16 (v: 32 wide), intermediate 160; the CPU SDPA kernel returns (out, lse)
        assert [n for n, _ in saved] == ["mm", "mm", SDPA_CPU, "mm", "mm"]
        assert [w for n, w in saved if n == "mm"] == [64, 32, 160, 64]   # q_proj, v_proj, gate_proj, down_proj


def test_with_a_tiled_mlp_the_mlp_saves_nothing(monkeypatch):
    """The tiled MLP's forward runs under no_grad: its mms are neither saved nor counted, so a layer
    keeps q, v and the attention output only (the planner's op model must drop gate/down then)."""
    for saved in _saved_per_layer(monkeypatch, tiles=4):
        assert saved == [("mm", 64), ("mm", 32), (SDPA_CPU, 16)]


def test_ops_under_no_grad_are_neither_saved_nor_counted():
    """The tiled MLP's forward tiles (no_grad) stay out of the cache; the parity of later mms holds."""
    from collections import defaultdict
    from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext
    meta = defaultdict(int)
    policy = sac.op_policy(meta)
    ctx = SelectiveCheckpointContext(is_recompute=False)
    a = torch.ones(2, 2)
    with torch.no_grad():
        assert policy(ctx, torch.ops.aten.mm.default, a, a) is CheckpointPolicy.PREFER_RECOMPUTE
    assert meta["forward_mm_count"] == 0
    assert policy(ctx, torch.ops.aten.mm.default, a, a) is CheckpointPolicy.MUST_SAVE
    assert policy(ctx, torch.ops.aten.mm.default, a, a) is CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(ctx, torch.ops.aten.max.default, a) is CheckpointPolicy.MUST_SAVE
    assert policy(ctx, torch.ops.aten.silu.default, a) is CheckpointPolicy.PREFER_RECOMPUTE


def _peak(ckpt: GradCkpt) -> int:
    return tracked_peak(build(ckpt=ckpt)[0], batch(b=1, s=384))


def test_measured_peak_between_none_and_full():
    """Measured (384 tokens, hidden 64, 2 layers, fp32; 2 x 512 tokens: none 14.49 MB, op 9.34 MB, full
    7.49 MB)."""
    none, op, full = _peak(GradCkpt.NONE), _peak(GradCkpt.OP), _peak(GradCkpt.FULL)
    assert full < op < none
