"""Re-evaluate a plan's phase model for the optimizer kernel the run really uses.

The planner assumes CUDA, where torch.optim picks foreach AdamW (torch/optim/optimizer.py
_default_to_fused_or_foreach: foreach only for tensors on cuda / xpu / privateuse1). A run on CPU (the
CPU truth tests, tests/runtime/test_peak_truth.py) uses the per-tensor loop instead, whose temporaries
differ: 2 x 4 B of the largest tensor instead of 4 B/param, and under DeepSpeed (torch_adam over ONE
flat fp32 partition) that is 8P instead of 4P. Pure: no torch.
"""
from __future__ import annotations

from shardtrain.compiler.inventory import tensor_inventory
from shardtrain.compiler.memory import CUDA_CONTEXT_BYTES, model_state_bytes, shard_group_size
from shardtrain.compiler.phases import candidate_phases
from shardtrain.compiler.plan import MemoryBreakdown


def plan_phases(plan, *, foreach_optimizer: bool) -> tuple[dict[str, MemoryBreakdown], str]:
    """({phase: MemoryBreakdown}, peak phase) of the plan's chosen candidate with the given kernel
    (the same arguments as planner._evaluate; foreach_optimizer=True reproduces the plan)."""
    c, t, m, hw = plan.chosen, plan.train, plan.model, plan.hardware
    groups = tensor_inventory(m, c.method, t.lora.rank, plan.lora_targets or t.lora.targets)
    ms = model_state_bytes(m, groups, c.strategy, hw, method=c.method, precision=c.precision,
                           optimizer=c.optimizer, fsdp_defer_grad_sync=c.fsdp_defer_grad_sync)
    return candidate_phases(m, groups, c.strategy, ms, shard_size=shard_group_size(c.strategy, hw),
                            method=c.method, precision=c.precision, optimizer=c.optimizer,
                            micro_batch=c.micro_batch_size, seq_len=t.seq_len, attention=t.attention,
                            grad_ckpt=c.gradient_checkpointing, selective_every=t.selective_every,
                            grad_accum=c.grad_accum_steps, defer_grad_sync=c.fsdp_defer_grad_sync,
                            loss=c.loss, chunk_tokens=t.loss_chunk_tokens,
                            activation_offload=c.activation_offload.value != "none",
                            cuda_context=CUDA_CONTEXT_BYTES, foreach_optimizer=foreach_optimizer)
