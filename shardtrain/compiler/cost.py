"""Relative step-time model: compute + communication + offload traffic, in seconds per optimizer step.

Compute (Kaplan et al. 2020; Narayanan et al. 2021): 6·N_active·tokens for full training (2 forward
+ 4 backward), 4·N for LoRA/QLoRA (no weight gradients for frozen matrices), plus attention
12·L·s·d_attn per token halved for causal masks; recomputation adds one forward (2·N) for the
checkpointed fraction. Achieved FLOP/s = peak × MFU, where MFU grows with tokens per micro-step.
Communication (ZeRO paper §7): ring collectives move (n-1)/n of the payload; DDP / ZeRO-1 2Ψ per
optimizer step (no_sync / local accumulation); DeepSpeed ZeRO-2 reduce-scatters every micro-step
(Ψ) and all-gathers once (Ψ); ZeRO-3 / FSDP full shard 3Ψ per micro-step (gather fwd + gather bwd +
reduce-scatter); FSDP SHARD_GRAD_OP 2Ψ per micro-step. Offload adds PCIe traffic and DeepSpeedCPUAdam
time; ZeRO-Infinity adds NVMe reads and writes of the optimizer states (and params).
Chunked loss recomputes the output projection in backward (checkpointed chunks): +2·h·V FLOPs per
token. Activation offload (torch.autograd.graph.save_on_cpu) copies the saved activations to the host
in forward and back in backward, synchronously: 2 × offloaded bytes per micro-step over PCIe, exposed;
checkpoint offload (compiler/savers.py) moves the checkpointed layer inputs the same way (the planner adds
them to the offloaded bytes). Tiled MLP (savers.py, DeepSpeed TiledMLP) runs every layer's MLP forward once
more per step (its backward recomputes it tile by tile): +2·3·h·I FLOPs per token per layer.
Only ratios between plans matter; absolute seconds are rough.
"""
from __future__ import annotations

import math

from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.activations import tokens_per_rank
from shardtrain.compiler.mesh_cost import cp_comm_s, fsdp_shard_bw, tp_comm_s, world_bw
from shardtrain.compiler.mesh_memory import mesh_of, mesh_shard_size, tp_num_params
from shardtrain.compiler.savers import mlp_forward_flops_per_token
from shardtrain.compiler.specs import Engine, HardwareSpec, Method, OffloadDevice, ParallelDims, Precision, Strategy

MFU_MAX = 0.45
"""Model FLOP utilisation a well-tuned dense LLM step reaches on large micro-batches."""
MFU_TOKENS_HALF = 1024
"""Tokens per micro-step at which MFU reaches ~63% of MFU_MAX (small batches underfill the GPU)."""
FP32_SPEED = 0.5
"""fp32 (TF32) matmul throughput relative to bf16 tensor cores."""
COMM_OVERLAP = 0.5
"""Fraction of compute time that can hide communication (bucketing, prefetch); the rest is exposed."""
COLLECTIVE_LATENCY_S = 30e-6
"""Launch + synchronisation latency of one collective (NCCL ring, small-message regime)."""
ENGINE_OVERHEAD = {
    Strategy.DDP: 1.00, Strategy.ZERO1: 1.01, Strategy.ZERO2: 1.02, Strategy.FSDP_SHARD_GRAD_OP: 1.03,
    Strategy.FSDP_HYBRID_SHARD: 1.05, Strategy.FSDP_FULL_SHARD: 1.05, Strategy.ZERO3: 1.10,
    Strategy.ZERO2_OFFLOAD: 1.05, Strategy.ZERO3_OFFLOAD: 1.12, Strategy.ZERO_INFINITY: 1.15,
    Strategy.ZERO3_OPT_OFFLOAD: 1.11, Strategy.FSDP_OFFLOAD: 1.06,
}
"""Compute-time multiplier for per-parameter hooks, flattening and Python bookkeeping of each engine
(ZeRO-3's gather/release hooks cost most). Calibratable; ordering matters more than values."""
MICRO_STEP_OVERHEAD_S = 0.002
"""Fixed launch/Python overhead per micro-step."""
QLORA_DEQUANT_FACTOR = 1.25
"""QLoRA dequantises NF4 weights per matmul: ~25% slower than 16-bit LoRA (QLoRA paper, §4)."""
TORCH_CPU_ADAM_SLOWDOWN = 1.0
"""FSDP_OFFLOAD steps torch's own AdamW on the host shards, not DeepSpeedCPUAdam. ZeRO-Offload (Ren et al.
2021, §4.1) measured its CPU-Adam 5.1-6.5x faster than PyTorch's CPU Adam of the time, but the runtime
builds torch's *fused* AdamW (runtime/optim.py; also the HF Trainer's default): measured 1.01x
DeepSpeedCPUAdam per step (the per-tensor loop: 12.4x), benchmarks/host_adam.py, results/host_adam.md."""


def _ring(bytes_: float, n: int, bw: float) -> float:
    return 0.0 if n <= 1 else bytes_ * (n - 1) / n / bw


def step_time(model: ModelSpec, strategy: Strategy, hw: HardwareSpec, *, method: Method,
              precision: Precision, micro_batch: int, grad_accum: int, seq_len: int,
              ckpt_fraction: float, trainable_params: int, fsdp_defer_grad_sync: bool = False,
              chunked_loss: bool = False, activation_offload_bytes: int = 0,
              parallel: ParallelDims | None = None, tiled_mlp: bool = False) -> float:
    """Estimated seconds per optimizer step: compute + communication not hidden behind it + offload.

    `parallel`: the device mesh (None: the strategy's 1-D mesh; same numbers). `micro_batch` is per dp
    rank, `trainable_params` the whole model's. On a mesh each rank computes 1/tp of every matmul
    (Megatron column/row split; attention heads / tp) over its micro_batch × seq_len / cp tokens (each
    query of a cp rank still attends to all seq_len keys: the per-token attention FLOPs stay), with MFU
    taken at those tokens (narrower tp matmuls are not modelled). FSDP/ZeRO collectives carry the
    tp-local parameters over the dp_shard × cp group, on the link its ranks span (mesh_cost.py); HSDP
    adds the all-reduce of the sharded gradients over dp_replicate; tp and cp collectives are exposed
    per micro-step (mesh_cost.tp_comm_s, cp_comm_s)."""
    mesh = mesh_of(strategy, hw, parallel)
    tp = mesh.tp
    tokens_micro = tokens_per_rank(micro_batch, seq_len, parallel)
    N = model.active_params
    attn = 12 * model.num_layers * seq_len * model.num_heads * model.head_dim * 0.5
    fwd = 2 * N + attn / 3
    per_token = (3 * fwd if method is Method.FULL else 2 * fwd) + ckpt_fraction * fwd
    if chunked_loss:
        per_token += 2 * model.hidden_size * model.vocab_size  # lm_head forward recomputed per chunk
    if tiled_mlp:
        per_token += mlp_forward_flops_per_token(model)  # TiledMLP.backward recomputes each tile's forward
    if tp > 1:
        per_token /= tp     # every matmul (and the lm_head) split tp ways; embedding/norms negligible
    mfu = MFU_MAX * (1 - math.exp(-tokens_micro / MFU_TOKENS_HALF))
    flops_s = hw.bf16_tflops * 1e12 * mfu * (FP32_SPEED if precision is Precision.FP32 else 1.0)
    compute = per_token * tokens_micro * grad_accum / flops_s
    if method is Method.QLORA:
        compute *= QLORA_DEQUANT_FACTOR
    compute *= ENGINE_OVERHEAD[strategy]
    compute += MICRO_STEP_OVERHEAD_S * grad_accum
    if strategy.shards_params or strategy is Strategy.FSDP_SHARD_GRAD_OP:
        per_layer = 2 if strategy is Strategy.FSDP_SHARD_GRAD_OP else 3  # gathers (+ re-gather) + RS
        compute += COLLECTIVE_LATENCY_S * per_layer * model.num_layers * grad_accum

    # data-parallel groups: DDP / DeepSpeed reduce over every rank of one tp index (dp × cp), across
    # the world; one rank per tp index holds 1/tp of the model (mesh_memory.tp_num_params)
    W = mesh.grad_reduce
    bw = world_bw(hw)
    p = precision.param_bytes
    T, P = trainable_params, model.num_params
    if tp > 1:
        P_tp = tp_num_params(model, tp)
        T = T * P_tp / P if method is Method.FULL else T   # LoRA adapters: kept whole (conservative)
        P = P_tp
    K = grad_accum
    if strategy is Strategy.DDP:
        comm = 2 * _ring(4 * T, W, bw)  # fp32 grads all-reduce (reduce-scatter + all-gather) once per step
    elif strategy is Strategy.ZERO1:
        comm = 2 * _ring(p * T, W, bw)
    elif strategy.engine is Engine.DEEPSPEED and strategy.zero_stage == 2:
        comm = K * _ring(p * T, W, bw) + _ring(p * T, W, bw)
    elif strategy.engine is Engine.DEEPSPEED:  # stage 3: gathers of all params (frozen too) + RS of grads
        comm = K * (2 * _ring(p * P, W, bw) + _ring(p * T, W, bw))
    else:  # FSDP2 over dp_shard × cp; HSDP (dp_replicate > 1) all-reduces the shard across replicas
        S = mesh.fsdp_shard
        sbw = fsdp_shard_bw(mesh, hw)
        gathers = 1 if strategy is Strategy.FSDP_SHARD_GRAD_OP else 2
        rs_count = 1 if fsdp_defer_grad_sync else K
        comm = K * gathers * _ring(p * P, S, sbw) + rs_count * _ring(4 * T, S, sbw)
        if mesh.dp_replicate > 1:
            comm += 2 * _ring(4 * T / S, mesh.dp_replicate, bw)

    offload = 0.0
    Nsh = mesh_shard_size(strategy, mesh)
    if strategy is Strategy.FSDP_OFFLOAD:
        offload = _fsdp_offload_s(model, hw, method=method, precision=precision, T=T, P=P, n=Nsh, K=K)
    elif strategy.offload_optimizer is not OffloadDevice.NONE:
        # grads out (fp32 partition) every micro-step for stage 2/3, updated 16-bit params back in
        pcie = (K * 4 * T / Nsh + p * T / Nsh) / hw.pcie_bandwidth_bytes_per_s
        cpu_adam = T / Nsh * hw.gpus_per_node / hw.cpu_adam_params_per_s
        offload += pcie + cpu_adam
        if strategy.offload_optimizer is OffloadDevice.NVME:
            offload += 2 * 12 * T / Nsh * hw.gpus_per_node / hw.nvme_bandwidth_bytes_per_s
    if strategy.offload_params is not OffloadDevice.NONE and strategy.engine is Engine.DEEPSPEED:
        offload += K * 2 * p * P / Nsh / hw.pcie_bandwidth_bytes_per_s
        if strategy.offload_params is OffloadDevice.NVME:
            offload += K * 2 * p * P / Nsh * hw.gpus_per_node / hw.nvme_bandwidth_bytes_per_s
    if activation_offload_bytes:
        offload += K * 2 * activation_offload_bytes / hw.pcie_bandwidth_bytes_per_s
    hidden = min(comm, COMM_OVERLAP * compute)
    total = compute + comm - hidden + offload
    if not mesh.is_data_parallel_only:
        # tp / cp collectives: on the critical path of every micro-step (mesh_cost.py)
        total += K * (tp_comm_s(model, precision, tokens_micro, mesh, hw, ckpt_fraction=ckpt_fraction,
                                chunked_loss=chunked_loss)
                      + cp_comm_s(model, precision, tokens_micro, seq_len, mesh, hw, ckpt_fraction=ckpt_fraction,
                                  flops_s=flops_s))
    return total


def _fsdp_offload_s(model: ModelSpec, hw: HardwareSpec, *, method: Method, precision: Precision, T: float,
                    P: float, n: int, K: int) -> float:
    """Host traffic and the host step of FSDP2 + CPUOffloadPolicy per optimizer step (exposed, as the
    ZeRO-Offload terms above): each micro-step copies every host shard in for the forward gather and
    again for the backward re-gather (_fsdp_param.py all_gather_inputs: `.to(device)` of the stored
    shard: fp32 trainable, frozen in its storage dtype, NF4 for QLoRA) and the fp32 sharded grads out
    (_fsdp_collectives.py foreach_reduce); the optimizer is torch's, on the host, over every GPU's shard
    of the node at once (TORCH_CPU_ADAM_SLOWDOWN)."""
    from shardtrain.compiler.memory import QLORA_BYTES_PER_PARAM
    frozen_bpp = QLORA_BYTES_PER_PARAM if method is Method.QLORA else precision.param_bytes
    stored = 4 * T + frozen_bpp * max(P - T, 0)
    pcie = K * (2 * stored + 4 * T) / n / hw.pcie_bandwidth_bytes_per_s
    host_step = T / n * hw.gpus_per_node * TORCH_CPU_ADAM_SLOWDOWN / hw.cpu_adam_params_per_s
    return pcie + host_step
