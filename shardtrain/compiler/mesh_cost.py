"""Step-time terms of the device mesh (compiler/cost.py step_time): which link each mesh group crosses,
and the tensor-parallel and context-parallel collectives of one micro-step on one rank.

Links: the mesh is laid out (dp_replicate, dp_shard, cp, tp), tp innermost (torchtitan ParallelDims,
accelerate ParallelismConfig; init_device_mesh fills consecutive ranks along the last dim). A group
whose ranks lie within `span` consecutive ranks stays inside a node when span <= gpus_per_node: tp
spans tp, a cp group cp·tp, the FSDP shard group (dp_shard × cp) dp_shard·cp·tp; dp_replicate,
DDP's / DeepSpeed's data-parallel groups take one rank per tp index across the whole world.
Sizes: ring collectives move (n-1)/n of the payload per rank (ZeRO paper §7; NCCL ring), an all-reduce
twice that (reduce-scatter + all-gather).
"""
from __future__ import annotations

from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.specs import CpMode, HardwareSpec, ParallelDims, Precision

COLLECTIVE_LATENCY_S = 30e-6
"""Launch + synchronisation latency of one collective (cost.py's constant; repeated to avoid a cycle)."""


def ring_s(bytes_: float, n: int, bw: float) -> float:
    """Seconds of a ring reduce-scatter or all-gather of `bytes_` over n ranks."""
    return 0.0 if n <= 1 else bytes_ * (n - 1) / n / bw


def link_bw(span: int, hw: HardwareSpec) -> float:
    """Bandwidth per GPU of a group whose ranks lie within `span` consecutive ranks."""
    return hw.intra_node_bandwidth_bytes_per_s if span <= hw.gpus_per_node else hw.inter_node_bandwidth_bytes_per_s


def fsdp_shard_bw(mesh: ParallelDims, hw: HardwareSpec) -> float:
    """Link of the FSDP/ZeRO shard group dp_shard × cp (ranks dp_shard·cp·tp apart at most)."""
    return link_bw(mesh.dp_shard * mesh.cp * mesh.tp, hw)


def world_bw(hw: HardwareSpec) -> float:
    """Link of a group spanning the world (dp_replicate, data-parallel groups): inter-node past one node."""
    return link_bw(hw.world_size, hw)


def tp_comm_s(model: ModelSpec, precision: Precision, tokens: int, mesh: ParallelDims, hw: HardwareSpec, *,
              ckpt_fraction: float, chunked_loss: bool) -> float:
    """Seconds of tensor-parallel communication per micro-step on one rank, all exposed.

    Megatron-LM (Shoeybi et al. 2019 §3, the f/g operators): per decoder layer 2 all-reduces of the
    b·s·h activations in the forward (after o_proj and down_proj, row-parallel) and 2 in the backward
    (the input gradients of the column-parallel q/k/v and gate/up); sequence parallel replaces each by a
    reduce-scatter + all-gather of the same volume (Korthikanti et al. 2022 §4.2.2). Recomputed layers
    repeat the forward's 2. They sit on the critical path between dependent matmuls, so none is hidden
    (cost.py's COMM_OVERLAP does not apply). lm_head colwise_gather_output: an all-gather of the logits
    (again per chunk when the chunked loss recomputes it) and an all-reduce of its input gradient."""
    tp = mesh.tp
    if tp == 1:
        return 0.0
    bw = link_bw(tp, hw)
    p = precision.param_bytes
    act = tokens * model.hidden_size * p
    per_layer = 4 + 2 * ckpt_fraction
    allreduce = 2 * ring_s(act, tp, bw)
    logits = tokens * model.vocab_size * p
    head = ring_s(logits, tp, bw) * (2 if chunked_loss else 1) + allreduce
    return (model.num_layers * per_layer * (allreduce + COLLECTIVE_LATENCY_S) + head
            + 3 * COLLECTIVE_LATENCY_S)


def cp_comm_s(model: ModelSpec, precision: Precision, tokens: int, seq_len: int, mesh: ParallelDims,
              hw: HardwareSpec, *, ckpt_fraction: float, flops_s: float) -> float:
    """Exposed seconds of context-parallel communication per micro-step on one rank.

    Ulysses (Jacobs et al. 2023 §3; DeepSpeed ulysses_sp.py): all-to-alls of q, k, v before attention and
    of its output after it, forward and backward (and again for a recomputed layer); each rank sends
    (cp-1)/cp of its tokens × (heads/tp)·head_dim (kv heads repeated up to cp) and waits for them —
    exposed. Ring (Liu et al. 2023; torch _context_parallel/_attention.py): cp-1 K/V block passes per
    layer in the forward, K/V + fp32 dK/dV in the backward, each overlapped with the attention block
    computed meanwhile: exposed only by what exceeds the attention compute (2·s·qd FLOPs per token per
    layer forward, twice that backward; causal halves included)."""
    cp, tp = mesh.cp, mesh.tp
    if cp == 1:
        return 0.0
    bw = link_bw(cp * tp, hw)
    p, hd, L = precision.param_bytes, model.head_dim, model.num_layers
    qd = -(-model.num_heads // tp) * hd
    kv_heads = -(-model.num_kv_heads // tp)
    passes = 2 + ckpt_fraction            # forward, backward, recompute
    if mesh.cp_mode is CpMode.ULYSSES:
        kvd = max(kv_heads, cp) * hd
        per_pass = tokens * p * (2 * qd + 2 * kvd) * (cp - 1) / cp / bw + 4 * COLLECTIVE_LATENCY_S
        return L * passes * per_pass
    kvd = kv_heads * hd
    kv_block = tokens * 2 * kvd
    fwd_attn_s = 2 * seq_len * qd * tokens / flops_s     # one layer's attention forward on this rank
    fwd_comm = (cp - 1) * (kv_block * p / bw + COLLECTIVE_LATENCY_S)
    bwd_comm = (cp - 1) * (kv_block * (p + 4) / bw + COLLECTIVE_LATENCY_S)
    fwd = max(0.0, fwd_comm - fwd_attn_s)
    bwd = max(0.0, bwd_comm - 2 * fwd_attn_s)
    return L * ((1 + ckpt_fraction) * fwd + bwd)
