"""The device mesh in the step-time model (issue 18 point 4): per-rank FLOPs / tp over tokens / cp, FSDP
collectives over the shard group's link, HSDP's cross-replica all-reduce, exposed tp all-reduces,
Ulysses all-to-alls, ring K/V passes beyond the attention compute. Expectations computed here by hand
from the model's dimensions and the hardware's bandwidths. Pure."""
from __future__ import annotations

import itertools
import math

import pytest

from shardtrain.compiler import cost
from shardtrain.compiler.cost import step_time
from shardtrain.compiler.mesh_cost import COLLECTIVE_LATENCY_S, cp_comm_s, tp_comm_s
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.specs import CpMode, HardwareSpec, Method, ParallelDims, Precision, Strategy
from shardtrain.config.presets import load_model_spec

M = ModelSpec.build(name="tiny", model_type="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, vocab_size=256)
P_FULL = 2 * 256 * 64 + 64 + 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64)   # 106 816
P_TP2 = 256 * 64 + 128 * 64 + 64 + 2 * (32 * 64 + 2 * 16 * 64 + 64 * 32 + 3 * 64 * 64 + 2 * 64)   # 61 760
BF16 = Precision.BF16
INTRA, INTER = 450e9, 50e9


def _hw(gpus: int, nodes: int = 1, **kw) -> HardwareSpec:
    return HardwareSpec(nodes=nodes, gpus_per_node=gpus, **kw)


def _ring(b: float, n: int, bw: float) -> float:
    return 0.0 if n == 1 else b * (n - 1) / n / bw


def _compute_s(hw, strategy, *, tokens, seq, accum, ckpt_f, tp) -> float:
    """Per-rank compute: (3 + f) forward FLOPs per token (6N + attention), / tp, at MFU(tokens)."""
    attn = 12 * M.num_layers * seq * M.num_heads * M.head_dim * 0.5
    per_tok = (3 + ckpt_f) * (2 * M.num_params + attn / 3) / tp
    mfu = cost.MFU_MAX * (1 - math.exp(-tokens / cost.MFU_TOKENS_HALF))
    c = per_tok * tokens * accum / (hw.bf16_tflops * 1e12 * mfu) * cost.ENGINE_OVERHEAD[strategy]
    return c + cost.MICRO_STEP_OVERHEAD_S * accum + COLLECTIVE_LATENCY_S * 3 * M.num_layers * accum


def _step(strategy, hw, mesh, *, micro=1, seq=512, accum=2, ckpt_f=0.0, method=Method.FULL, **kw):
    return step_time(M, strategy, hw, method=method, precision=BF16, micro_batch=micro, grad_accum=accum,
                     seq_len=seq, ckpt_fraction=ckpt_f, trainable_params=P_FULL, parallel=mesh, **kw)


def test_counts():
    assert M.num_params == P_FULL


def test_tp_collectives_hand_computed():
    """Megatron f/g: 4 all-reduces of t·h·p per layer (+2 per recomputed layer) and the lm_head's
    logits all-gather + input-gradient all-reduce; intra-node while tp fits a node."""
    t, f = 512, 1.0
    ar = 2 * (t * 64 * 2) * (1 / 2) / INTRA
    head = (t * 256 * 2) * (1 / 2) / INTRA + ar
    want = 2 * (4 + 2 * f) * (ar + COLLECTIVE_LATENCY_S) + head + 3 * COLLECTIVE_LATENCY_S
    assert tp_comm_s(M, BF16, t, ParallelDims(dp_shard=4, tp=2), _hw(8), ckpt_fraction=f,
                     chunked_loss=False) == pytest.approx(want, rel=1e-12)
    # tp across nodes (1 GPU per node): the same volume on the network
    ar_x = 2 * (t * 64 * 2) * (1 / 2) / INTER
    head_x = (t * 256 * 2) * (1 / 2) / INTER + ar_x
    want_x = 2 * (4 + 2 * f) * (ar_x + COLLECTIVE_LATENCY_S) + head_x + 3 * COLLECTIVE_LATENCY_S
    assert tp_comm_s(M, BF16, t, ParallelDims(tp=2), _hw(1, 2), ckpt_fraction=f,
                     chunked_loss=False) == pytest.approx(want_x, rel=1e-12)


def test_ulysses_all_to_alls_hand_computed():
    """cp 2: per layer and pass (forward, backward, recompute) each rank sends half of its q, k, v and
    output (q 4 heads × 16, kv 2 heads × 16): 4 all-to-alls."""
    t = 512
    per_pass = t * 2 * (2 * 64 + 2 * 32) * (1 / 2) / INTRA + 4 * COLLECTIVE_LATENCY_S
    got = cp_comm_s(M, BF16, t, 1024, ParallelDims(cp=2), _hw(2), ckpt_fraction=0.0, flops_s=1e15)
    assert got == pytest.approx(2 * 2 * per_pass, rel=1e-12)
    # tp 2 × cp 2 on nodes of 2 GPUs: the cp group spans 4 ranks -> the network, and kv is repeated to 2 heads
    per_pass_x = t * 2 * (2 * 32 + 2 * 32) * (1 / 2) / INTER + 4 * COLLECTIVE_LATENCY_S
    got_x = cp_comm_s(M, BF16, t, 1024, ParallelDims(tp=2, cp=2), _hw(2, 2), ckpt_fraction=1.0, flops_s=1e15)
    assert got_x == pytest.approx(2 * 3 * per_pass_x, rel=1e-12)


def test_ring_passes_hide_behind_attention():
    t, seq, cp = 512, 1024, 2
    kv = t * 2 * 32
    mesh = ParallelDims(cp=cp, cp_mode=CpMode.RING)
    # slow compute: the attention of a block (2·s·qd FLOPs per token) outlasts the K/V pass
    assert cp_comm_s(M, BF16, t, seq, mesh, _hw(2), ckpt_fraction=0.0, flops_s=1e9) == 0.0
    # fast compute on a slow link: what the pass takes beyond the attention
    flops = 1e15
    hw = _hw(1, 2)
    attn_fwd = 2 * seq * 64 * t / flops
    fwd = (kv * 2 / INTER + COLLECTIVE_LATENCY_S) - attn_fwd
    bwd = (kv * (2 + 4) / INTER + COLLECTIVE_LATENCY_S) - 2 * attn_fwd
    assert fwd > 0 and bwd > 0
    assert cp_comm_s(M, BF16, t, seq, mesh, hw, ckpt_fraction=0.0, flops_s=flops) == \
        pytest.approx(2 * (fwd + bwd), rel=1e-12)


def test_hsdp_2x4_hand_computed():
    """HSDP dp_replicate 2 × dp_shard 4 on 2 nodes of 4: all-gathers (forward + backward) and the fp32
    reduce-scatter inside a node, the all-reduce of the 1/4 shard across the 2 replicas on the network;
    communication hidden up to half the compute. The same as fsdp_hybrid_shard's 1-D meaning."""
    hw, K, t = _hw(4, 2), 2, 512
    comp = _compute_s(hw, Strategy.FSDP_FULL_SHARD, tokens=t, seq=512, accum=K, ckpt_f=0.0, tp=1)
    comm = K * 2 * _ring(2 * P_FULL, 4, INTRA) + K * _ring(4 * P_FULL, 4, INTRA) + 2 * _ring(4 * P_FULL / 4, 2, INTER)
    want = comp + comm - min(comm, cost.COMM_OVERLAP * comp)
    mesh = ParallelDims(dp_replicate=2, dp_shard=4)
    assert _step(Strategy.FSDP_FULL_SHARD, hw, mesh, accum=K) == pytest.approx(want, rel=1e-12)
    assert _step(Strategy.FSDP_HYBRID_SHARD, hw, mesh, accum=K) == _step(Strategy.FSDP_HYBRID_SHARD, hw, None, accum=K)


def test_tp2_dp4_hand_computed():
    """tp 2 × dp_shard 4 on one node of 8: half the FLOPs per rank, FSDP collectives of the tp-local
    parameters over 4 ranks, plus the exposed tp all-reduces of every micro-step."""
    hw, K, t, f = _hw(8), 2, 1024, 1.0
    mesh = ParallelDims(dp_shard=4, tp=2)
    comp = _compute_s(hw, Strategy.FSDP_FULL_SHARD, tokens=t, seq=1024, accum=K, ckpt_f=f, tp=2)
    comm = K * 2 * _ring(2 * P_TP2, 4, INTRA) + K * _ring(4 * P_TP2, 4, INTRA)
    ar = 2 * _ring(t * 64 * 2, 2, INTRA)
    tp = 2 * (4 + 2 * f) * (ar + COLLECTIVE_LATENCY_S) + _ring(t * 256 * 2, 2, INTRA) + ar + 3 * COLLECTIVE_LATENCY_S
    want = comp + comm - min(comm, cost.COMM_OVERLAP * comp) + K * tp
    assert _step(Strategy.FSDP_FULL_SHARD, hw, mesh, seq=1024, accum=K, ckpt_f=f) == pytest.approx(want, rel=1e-12)


def test_more_tp_or_cp_cuts_the_per_rank_compute():
    """With free links, adding tp (same tokens) or cp (half the tokens) ranks at a fixed dp shortens the
    step of an 8B model (on the tiny one, the fixed per-collective latencies of tp outweigh its FLOPs)."""
    m = load_model_spec("llama-3.1-8b")
    free = dict(intra_node_bandwidth_bytes_per_s=1e30, inter_node_bandwidth_bytes_per_s=1e30)
    s = Strategy.FSDP_FULL_SHARD

    def t(mesh):
        return step_time(m, s, _hw(mesh.world, **free), method=Method.FULL, precision=BF16, micro_batch=1,
                         grad_accum=2, seq_len=8192, ckpt_fraction=1.0, trainable_params=m.num_params, parallel=mesh)
    base = t(ParallelDims(dp_shard=2))
    for mesh in (ParallelDims(dp_shard=2, tp=2), ParallelDims(dp_shard=2, cp=2),
                 ParallelDims(dp_shard=2, cp=2, cp_mode=CpMode.RING)):
        assert t(mesh) < base
    assert t(ParallelDims(dp_shard=2, tp=4)) < t(ParallelDims(dp_shard=2, tp=2))
    # the tiny model: tp only adds latency
    assert _step(s, _hw(4, **free), ParallelDims(dp_shard=2, tp=2)) > _step(s, _hw(2, **free), ParallelDims(dp_shard=2))


def test_a_group_crossing_nodes_costs_more():
    """cp and tp groups placed across nodes (1 or 2 GPUs per node) pay the network; inside a node they do not."""
    s = Strategy.FSDP_FULL_SHARD
    for mesh in (ParallelDims(dp_shard=2, cp=2), ParallelDims(dp_shard=2, cp=2, cp_mode=CpMode.RING),
                 ParallelDims(dp_shard=2, tp=2)):
        assert _step(s, _hw(1, 4), mesh, seq=8192) > _step(s, _hw(4), mesh, seq=8192)


def test_every_one_d_time_is_unchanged():
    """parallel=None and the strategy's own 1-D mesh: the same float, bit for bit."""
    for (nodes, gpus), s, method, accum, defer, chunked, off in itertools.product(
            ((1, 8), (2, 4), (1, 1), (4, 2)), Strategy, (Method.FULL, Method.LORA), (1, 4), (False, True),
            (False, True), (0, 10**9)):
        hw = _hw(gpus, nodes)
        one_d = ParallelDims.for_strategy(s, hw.world_size, hw.gpus_per_node)
        kw = dict(method=method, accum=accum, fsdp_defer_grad_sync=defer, chunked_loss=chunked,
                  activation_offload_bytes=off, ckpt_f=0.5)
        assert _step(s, hw, None, **kw) == _step(s, hw, one_d, **kw), (s, nodes, gpus)
