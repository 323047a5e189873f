"""Re-evaluate a plan's phase model for the optimizer kernel the run really uses.

The planner assumes CUDA, where torch.optim picks foreach AdamW (torch/optim/optimizer.py
_default_to_fused_or_foreach: foreach only for tensors on cuda / xpu / privateuse1). A run on CPU (the
CPU truth tests, tests/runtime/test_peak_truth.py) uses the per-tensor loop instead, whose temporaries
differ: 2 x 4 B of the largest tensor instead of 4 B/param, and under DeepSpeed (torch_adam over ONE
flat fp32 partition) that is 8P instead of 4P. Pure: no torch.
"""
from __future__ import annotations

from shardtrain.compiler.inventory import tensor_inventory
from shardtrain.compiler.plan import MemoryBreakdown
from shardtrain.compiler.planner import evaluate_phases


def plan_phases(plan, *, foreach_optimizer: bool) -> tuple[dict[str, MemoryBreakdown], str]:
    """({phase: MemoryBreakdown}, peak phase) of the plan's chosen candidate with the given kernel
    (planner.evaluate_phases, as the planner ran it; foreach_optimizer=True reproduces the plan)."""
    c, t = plan.chosen, plan.train
    groups = tensor_inventory(plan.model, c.method, t.lora.rank, plan.lora_targets or t.lora.targets)
    _, phases, peak = evaluate_phases(plan.model, plan.hardware, t, groups, c.strategy, method=c.method,
                                      optimizer=c.optimizer, micro=c.micro_batch_size,
                                      ckpt=c.gradient_checkpointing, defer=c.fsdp_defer_grad_sync, loss=c.loss,
                                      act_offload=c.activation_offload, foreach_optimizer=foreach_optimizer)
    return phases, peak
