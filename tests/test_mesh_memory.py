"""The device mesh in the memory model (issue 18 point 3): tp-local tensors, FSDP/ZeRO sharding over
dp_shard × cp, activations per tp / cp rank, the logits path, cp transients. Every expectation is
computed here by hand from the model's dimensions (not by calling the function under test). Pure."""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict

import pytest

from shardtrain.compiler import activations as act
from shardtrain.compiler.inventory import tensor_inventory
from shardtrain.compiler.memory import host_bytes_per_node, model_state_bytes, shard_group_size
from shardtrain.compiler.mesh_memory import cp_transient_bytes, tp_local_groups, tp_num_params
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.phases import candidate_phases
from shardtrain.compiler.specs import (ActivationOffload, Attention, CpMode, GradCkpt, HardwareSpec, LossMode, Method,
                                       Optimizer, ParallelDims, Precision, Strategy)

# h 64, 2 layers, 4 heads of 16 (2 kv heads), I 128, V 256, untied
M = ModelSpec.build(name="tiny", model_type="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, vocab_size=256)
H, L, V, HD = 64, 2, 256, 16
BF16 = Precision.BF16

# (out, in) of each weight as ONE tp-2 rank holds it (transformers 5.23 Llama tp plan): colwise q/k/v/gate/up
# split out, rowwise o/down split in, embed_tokens and the norms whole, lm_head colwise on the vocab
TP2_LOCAL = {"embed_tokens": ((256, 64), 1), "lm_head": ((128, 64), 1), "norm": ((64,), 1),
             "layer_norms": ((64,), 4), "q_proj": ((32, 64), 2), "k_proj": ((16, 64), 2), "v_proj": ((16, 64), 2),
             "o_proj": ((64, 32), 2), "gate_proj": ((64, 64), 2), "up_proj": ((64, 64), 2),
             "down_proj": ((64, 64), 2)}
FULL = {"embed_tokens": ((256, 64), 1), "lm_head": ((256, 64), 1), "norm": ((64,), 1),
        "layer_norms": ((64,), 4), "q_proj": ((64, 64), 2), "k_proj": ((32, 64), 2), "v_proj": ((32, 64), 2),
        "o_proj": ((64, 64), 2), "gate_proj": ((128, 64), 2), "up_proj": ((128, 64), 2),
        "down_proj": ((64, 128), 2)}


def _fsdp_elems(table: dict, n: int) -> int:
    """Elements one FSDP2 rank stores: dim 0 padded to a multiple of n, then split."""
    return sum(c * math.ceil(s[0] / n) * math.prod(s[1:]) for s, c in table.values())


def _hw(gpus: int, nodes: int = 1) -> HardwareSpec:
    return HardwareSpec(nodes=nodes, gpus_per_node=gpus)


def _ms(strategy, hw, parallel, method=Method.FULL, optimizer=Optimizer.ADAMW, **kw):
    return model_state_bytes(M, tensor_inventory(M, method, lora_rank=4), strategy, hw, method=method,
                             precision=BF16, optimizer=optimizer, parallel=parallel, **kw)


def test_tp_local_shapes_follow_the_llama_plan():
    local = {g.name: (g.shape, g.count) for g in tp_local_groups(tensor_inventory(M, Method.FULL), 2)}
    assert local == TP2_LOCAL
    # peft 0.21.2 on a tp base layer: colwise -> lora_B split on out, rowwise -> lora_A split on in
    lora = {g.name: g.shape for g in tp_local_groups(tensor_inventory(M, Method.LORA, lora_rank=4), 2)
            if "lora" in g.name}
    assert lora["q_proj.lora_A"] == (4, 64) and lora["q_proj.lora_B"] == (32, 4)
    assert lora["k_proj.lora_B"] == (16, 4) and lora["gate_proj.lora_B"] == (64, 4)
    assert lora["o_proj.lora_A"] == (4, 32) and lora["o_proj.lora_B"] == (64, 4)
    assert lora["down_proj.lora_A"] == (4, 64) and lora["down_proj.lora_B"] == (64, 4)
    assert tp_num_params(M, 2) == sum(math.prod(s) * c for s, c in TP2_LOCAL.values())


@pytest.mark.parametrize("mesh,gpus,nodes,table,n", [
    (ParallelDims(tp=2), 2, 1, TP2_LOCAL, 1),
    (ParallelDims(cp=2), 2, 1, FULL, 2),
    (ParallelDims(cp=2, cp_mode=CpMode.RING), 2, 1, FULL, 2),
    (ParallelDims(dp_replicate=2, dp_shard=4), 4, 2, FULL, 4),
    (ParallelDims(dp_shard=4, tp=2), 8, 1, TP2_LOCAL, 4),
])
def test_fsdp_model_state_hand_computed(mesh, gpus, nodes, table, n):
    """FSDP2: fp32 params + fp32 grads + AdamW m, v over the tp-local tensors sharded over dp_shard × cp;
    buffers = 2 gathered units (bf16) + the unit's bf16 grads and fp32 reduce-scatter input."""
    ms = _ms(Strategy.FSDP_FULL_SHARD, _hw(gpus, nodes), mesh)
    e = _fsdp_elems(table, n)
    assert shard_group_size(Strategy.FSDP_FULL_SHARD, _hw(gpus, nodes), parallel=mesh) == n
    assert (ms.params, ms.grads, ms.optimizer_states, ms.master_params) == (4 * e, 4 * e, 8 * e, 0)
    layer = sum(math.prod(s) * c // L for k, (s, c) in table.items() if k not in ("embed_tokens", "lm_head", "norm"))
    unit = max(layer, math.prod(table["embed_tokens"][0]), math.prod(table["lm_head"][0]))
    assert ms.buffers == 2 * unit * 2 + unit * (2 + 4)


def test_zero_partitions_over_the_data_and_sequence_ranks():
    """DeepSpeed (AutoTP + ZeRO): one flat partition of the tp-local tensors per data × sequence rank."""
    T_local = sum(math.prod(s) * c for s, c in TP2_LOCAL.values())
    ms = _ms(Strategy.ZERO3, _hw(8), ParallelDims(dp_shard=4, tp=2))
    assert ms.optimizer_states == 8 * math.ceil(T_local / 4) and ms.master_params == 4 * sum(
        c * math.ceil(math.prod(s) / 4) for s, c in TP2_LOCAL.values())
    # no replicate dim in DeepSpeed: dp_replicate × dp_shard × cp ranks share the partition
    assert shard_group_size(Strategy.ZERO2, _hw(8), parallel=ParallelDims(dp_replicate=2, dp_shard=2, cp=2)) == 8
    assert shard_group_size(Strategy.DDP, _hw(8), parallel=ParallelDims(dp_replicate=8)) == 1


def test_a_mesh_that_does_not_multiply_out_is_one_line():
    with pytest.raises(ValueError, match=r"^parallel: dp_shard 2 × tp 2 is 4 ranks but the hardware has 8 .*multiply to 8$"):
        _ms(Strategy.FSDP_FULL_SHARD, _hw(8), ParallelDims(dp_shard=2, tp=2))


def test_layer_bytes_per_token_hand_computed():
    """bf16, SDPA: 2 norms × (fp32 input 4h + bf16 output 2h) + attention 2·(h + qd + 2·kvd + qd + qd)
    + MLP 2·(h + 4I); tp 2 halves heads, kv heads and I, not the norms nor the q/k/v and MLP inputs."""
    one = 2 * 6 * H + 2 * (H + 64 + 2 * 32 + 64 + 64) + 2 * (H + 4 * 128)
    two = 2 * 6 * H + 2 * (H + 32 + 2 * 16 + 32 + 32) + 2 * (H + 4 * 64)
    kw = dict(precision=BF16, attention=Attention.SDPA, seq_len=512)
    assert act.layer_bytes_per_token(M, **kw) == one == 2560
    assert act.layer_bytes_per_token(M, **kw, parallel=ParallelDims(tp=2)) == two == 1792
    # cp leaves the per-token bytes alone (each rank holds seq / cp tokens); Ulysses with tp 2 × cp 2
    # repeats the one local kv head up to cp = 2 (DeepSpeed kv_replication_factor)
    assert act.layer_bytes_per_token(M, **kw, parallel=ParallelDims(cp=2)) == one
    assert act.layer_bytes_per_token(M, **kw, parallel=ParallelDims(cp=2, cp_mode=CpMode.RING)) == one
    assert act.layer_bytes_per_token(M, **kw, parallel=ParallelDims(tp=2, cp=2)) == two + 2 * 2 * 16
    assert act.layer_bytes_per_token(M, **kw, parallel=ParallelDims(tp=2, cp=2, cp_mode=CpMode.RING)) == two


MHA = ModelSpec.build(name="mha", model_type="llama", hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=8,
                      intermediate_size=1024, vocab_size=512)


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_korthikanti_table2_form(t, monkeypatch):
    """Korthikanti et al. 2022 Table 2, tensor parallel without SP: sbh(α + β/t + γ·as/(ht)) — GPT's
    α = 10, β = 24, γ = 5; for the Llama block (bf16, eager, MHA, no dropout) α = 16 (two norms' fp32
    input + bf16 output, the q/k/v and MLP inputs), β = 2·(5 + 16) = 42 (q, k, v, attention output,
    o_proj input: 5 × h; gate, up, silu(gate), product: 4 tensors of I = 4h), γ = 6 (fp32 softmax + bf16 copy).
    With sequence parallel: sbh/t(α + β + γ·as/h)."""
    s, b, a, h = 1024, 2, 8, 256
    kw = dict(precision=BF16, attention=Attention.EAGER, seq_len=s, parallel=ParallelDims(tp=t))
    got = act.layer_bytes_per_token(MHA, **kw) * b * s
    assert got == s * b * h * (16 + 42 / t) + 6 * a * s * s * b / t
    monkeypatch.setattr(act, "TP_SEQUENCE_PARALLEL", True)
    assert act.layer_bytes_per_token(MHA, **kw) * b * s == s * b * h / t * (16 + 42 + 6 * a * s / h)


def test_cp_halves_the_per_rank_activations_and_logits():
    kw = dict(micro_batch=2, seq_len=1024, precision=BF16)
    for mesh in (ParallelDims(cp=2), ParallelDims(cp=2, cp_mode=CpMode.RING)):
        for ck in GradCkpt:
            a1 = act.activation_host_bytes(M, attention=Attention.SDPA, grad_ckpt=ck, offload=ActivationOffload.CPU, **kw)
            a2 = act.activation_host_bytes(M, attention=Attention.SDPA, grad_ckpt=ck, offload=ActivationOffload.CPU,
                                           parallel=mesh, **kw)
            assert 2 * a2 == a1
        assert 2 * act.logits_bytes(M, parallel=mesh, **kw) == act.logits_bytes(M, **kw) == 2 * 1024 * V * 14
    # the chunked loss: the chunk stays 512 tokens, the final norm's gradient halves
    assert act.logits_bytes(M, loss=LossMode.CHUNKED, parallel=ParallelDims(cp=2), **kw) == \
        12 * 512 * V + 2 * 1024 * H
    # tp: the full vocabulary on every tp rank (lm_head colwise_gather_output)
    assert act.logits_bytes(M, parallel=ParallelDims(tp=2), **kw) == act.logits_bytes(M, **kw)


def test_cp_transients_hand_computed():
    t = 512
    # Ulysses, tp 2 × cp 2: q of 2 local heads (32), kv heads 1 -> repeated to 2 (32): send copies
    fwd, bwd = cp_transient_bytes(M, BF16, t, ParallelDims(tp=2, cp=2))
    assert (fwd, bwd) == (2 * t * (32 + 2 * 32), 2 * t * (2 * 32 + 2 * 32))
    # ring, cp 2: two K/V blocks (2 kv heads × 16 each) in flight + fp32 output; backward fp32 grads
    fwd, bwd = cp_transient_bytes(M, BF16, t, ParallelDims(cp=2, cp_mode=CpMode.RING))
    kv = t * 2 * 32
    assert (fwd, bwd) == (2 * 2 * kv + 4 * t * 64, 2 * 2 * kv + 4 * (2 * t * 64 + 3 * kv))
    assert cp_transient_bytes(M, BF16, t, ParallelDims(tp=2)) == (0, 0)


def _phases(strategy, hw, mesh, *, seq=512, micro=1, ckpt=GradCkpt.NONE, loss=LossMode.FULL, method=Method.FULL):
    groups = tensor_inventory(M, method, lora_rank=4)
    ms = model_state_bytes(M, groups, strategy, hw, method=method, precision=BF16, optimizer=Optimizer.ADAMW,
                           parallel=mesh)
    return candidate_phases(M, groups, strategy, ms, shard_size=shard_group_size(strategy, hw, parallel=mesh),
                            method=method, precision=BF16, optimizer=Optimizer.ADAMW, micro_batch=micro, seq_len=seq,
                            attention=Attention.SDPA, grad_ckpt=ckpt, selective_every=2, grad_accum=1,
                            defer_grad_sync=False, loss=loss, parallel=mesh)[0]


def test_fsdp_optimizer_phase_on_tp2_dp4():
    """optimizer.step on tp 2 × dp_shard 4: the sharded fp32 grads, params and AdamW states; nothing else."""
    e = _fsdp_elems(TP2_LOCAL, 4)
    opt = _phases(Strategy.FSDP_FULL_SHARD, _hw(8), ParallelDims(dp_shard=4, tp=2))["optimizer"]
    assert (opt.params, opt.grads, opt.optimizer_states, opt.activations, opt.logits, opt.buffers) == \
        (4 * e, 4 * e, 8 * e, 0, 0, 0)


def test_fsdp_loss_instant_on_cp2():
    """Forward, no checkpointing, FULL loss on cp 2: the saved layers (L × per-token bytes incl. the
    measured +3h of the all-bf16 block) and the head tensors over seq / cp tokens, the fp32 loss path."""
    seq, t = 1024, 512
    fwd = _phases(Strategy.FSDP_FULL_SHARD, _hw(2), ParallelDims(cp=2), seq=seq)["forward"]
    per_tok = 2560 + 3 * H
    # head (activations.head_bytes_per_token since 98a611f): final norm's fp32 input 4h + normalised tensor
    # and output 2·e·h + RoPE cos/sin 2·head_dim·e, e = 2 (bf16 residual)
    kept, head = L * per_tok * t, (4 * H + 2 * 2 * H + 2 * HD * 2) * t
    loss_instant = kept + head + (2 + 12) * t * V - 4 * t * V     # bf16 logits + fp32 upcast + log_softmax
    lm_instant = kept + head + 2 * t * V
    assert fwd.activations + fwd.logits == max(loss_instant, lm_instant)


_BASES = [dict(dp_shard=2), dict(dp_shard=2, cp=2), dict(dp_replicate=2, dp_shard=2)]
_STRATS = [Strategy.FSDP_FULL_SHARD, Strategy.ZERO2, Strategy.ZERO1]


@pytest.mark.parametrize("base, strategy", [(b, s) for b in _BASES for s in _STRATS
                                            # DeepSpeed has no replicate dim (compiler/mesh.py)
                                            if not (s.engine.value == "deepspeed" and b.get("dp_replicate"))])
@pytest.mark.parametrize("method", [Method.FULL, Method.LORA])
def test_more_tp_never_raises_a_model_state_term(base, strategy, method):
    """At fixed dp / cp, adding tp ranks never raises any model-state term, the saved per-token layer
    bytes nor the per-rank peak. (One transient does grow: the lm_head all-gather keeps its tp-local slice,
    p·tokens·V/tp, next to the gathered logits — so the per-phase 'activations' term is not monotone.)"""
    prev = None
    for tp in (1, 2, 4):
        mesh = ParallelDims(**base, tp=tp)
        hw = _hw(mesh.world)
        ms = asdict(_ms(strategy, hw, mesh, method=method))
        per_tok = act.layer_bytes_per_token(M, BF16, Attention.SDPA, 512, parallel=mesh)
        peak = max(b.total for b in _phases(strategy, hw, mesh, seq=4096, method=method).values())
        cur = (ms, per_tok, peak)
        if prev:
            assert all(cur[0][k] <= prev[0][k] for k in ms), (tp, cur[0], prev[0])
            assert cur[1] < prev[1] and cur[2] <= prev[2]
        prev = cur


def test_every_one_d_number_is_unchanged():
    """parallel=None and the strategy's own 1-D mesh give the same bytes, field by field."""
    for method, (nodes, gpus), s in itertools.product((Method.FULL, Method.LORA, Method.QLORA), ((1, 8), (2, 4)),
                                                      Strategy):
        hw = _hw(gpus, nodes)
        one_d = ParallelDims.for_strategy(s, hw.world_size, hw.gpus_per_node)
        for accum in (1, 2):
            a = _ms(s, hw, None, method=method, grad_accum_steps=accum)
            b = _ms(s, hw, one_d, method=method, grad_accum_steps=accum)
            assert a == b, (s, method, nodes)
        assert host_bytes_per_node(M, s, hw, 7, BF16) == host_bytes_per_node(M, s, hw, 7, BF16, parallel=one_d)
        for ck, loss in itertools.product(GradCkpt, (LossMode.FULL, LossMode.CHUNKED)):
            assert _phases(s, hw, None, ckpt=ck, loss=loss, method=method) == \
                _phases(s, hw, one_d, ckpt=ck, loss=loss, method=method)
