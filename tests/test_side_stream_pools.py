"""FSDP2's side-stream pools in the reserved figure (compiler/phases.py fsdp_side_stream_pools,
compiler/allocator.py predict): the sizes by hand for Llama 3.1 8B, how they enter reserved, and the
torchtitan rows they were checked against (benchmarks/published). Plan only, ~1 s."""
from __future__ import annotations

import pytest

from shardtrain.compiler import allocator as al
from shardtrain.compiler.inventory import tensor_inventory, trainable_params
from shardtrain.compiler.memory import fsdp_shard_groups
from shardtrain.compiler.phases import fsdp_side_stream_pools
from shardtrain.compiler.plan import MemoryBreakdown
from shardtrain.compiler.specs import Engine, Method, Precision, Strategy
from shardtrain.config.presets import load_model_spec
from shardtrain.units import GiB, MiB

M = load_model_spec("llama-3.1-8b")


def _pools(strategy: Strategy, n: int, precision: Precision = Precision.BF16):
    groups = tensor_inventory(M, Method.FULL)
    return groups, fsdp_side_stream_pools(M, groups, strategy, shard_size=n, method=Method.FULL, precision=precision)


def test_sizes_by_hand_llama31_8b_on_8_ranks():
    groups, (ag, rs) = _pools(Strategy.FSDP_FULL_SHARD, 8)
    h, v, ffn, kv = 4096, 128256, 14336, 1024
    layer = 2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h          # q, o, k, v, gate/up/down, two norms
    root = 2 * v * h + h                                           # embedding, lm_head, final norm
    # all-gather copy-in stream: the root's and the first unit's bf16 all-gather outputs (8 divides every dim 0)
    assert ag == 2 * (root + layer)
    # reduce-scatter stream: every fp32 sharded gradient (views into its reduce-scatter outputs)
    assert rs == 4 * trainable_params(fsdp_shard_groups(groups, 8))
    assert rs == pytest.approx(4 * (32 * layer + root) / 8, rel=1e-6)
    assert 2.3 * GiB < ag < 2.4 * GiB and 3.7 * GiB < rs < 3.8 * GiB


def test_one_rank_has_no_all_gather_and_offload_keeps_one_output():
    _, (ag1, rs1) = _pools(Strategy.FSDP_FULL_SHARD, 1)
    assert ag1 == 0 and rs1 > 0
    _, (ag, rs) = _pools(Strategy.FSDP_OFFLOAD, 8)
    _, (_, rs_full) = _pools(Strategy.FSDP_FULL_SHARD, 8)
    # the grads go to the host: the pool holds one group's output at a time, the largest the root's shard
    assert ag > 0 and rs == 4 * -(-(2 * 128256 * 4096 + 4096) // 8) < rs_full


@pytest.mark.parametrize("strategy", [Strategy.DDP, Strategy.ZERO2, Strategy.ZERO3])
def test_other_engines_have_none(strategy):
    assert _pools(strategy, 8)[1] == (0, 0)


def _bd(grads: int, act: int) -> MemoryBreakdown:
    return MemoryBreakdown(params=4 * GiB, grads=grads, master_params=0, optimizer_states=8 * GiB, activations=act,
                           logits=0, buffers=0, cuda_context=768 * MiB)


def test_reserved_adds_what_the_side_streams_cache_beyond_the_live_grads():
    ag, rs = 2 * GiB, 3 * GiB
    phases = {"backward": _bd(grads=0, act=30 * GiB), "optimizer": _bd(grads=rs, act=0)}
    base = al.predict(phases, (), Engine.FSDP, expandable=True)
    with_side = al.predict(phases, (), Engine.FSDP, expandable=True, side_pools=(ag, rs))
    # the peak phase (backward) holds no grads: both pools add in full; allocated does not move
    assert with_side.peak_reserved_bytes - base.peak_reserved_bytes == ag + rs
    assert with_side.peak_allocated_bytes == base.peak_allocated_bytes
    # grads live at a phase are the reduce-scatter pool's own tensors: not counted twice
    assert al.side_stream_cached(phases["optimizer"], (ag, rs)) == ag
    # other engines: no FSDP2 side streams
    assert al.predict(phases, (), Engine.DDP, expandable=True, side_pools=(ag, rs)).peak_reserved_bytes == \
        al.predict(phases, (), Engine.DDP, expandable=True).peak_reserved_bytes


def test_default_allocator_never_below_expandable():
    phases = {"backward": _bd(grads=0, act=1 * GiB)}     # little transient: the fitted share is small
    side = (2 * GiB, 3 * GiB)
    exp = al.predict(phases, (), Engine.FSDP, expandable=True, side_pools=side).peak_reserved_bytes
    default = al.predict(phases, (), Engine.FSDP, expandable=False, side_pools=side).peak_reserved_bytes
    assert default >= exp
    big = {"backward": _bd(grads=0, act=40 * GiB)}       # activation-heavy: the fitted share dominates
    assert al.predict(big, (), Engine.FSDP, expandable=False, side_pools=side).peak_reserved_bytes > \
        al.predict(big, (), Engine.FSDP, expandable=True, side_pools=side).peak_reserved_bytes
