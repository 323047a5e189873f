"""Optimizers and the learning-rate schedule.

adamw      torch.optim.AdamW (fp32 states, 8 B/param); DeepSpeedCPUAdam when ZeRO offloads the optimizer
adamw8bit  bitsandbytes AdamW8bit (block-wise 8-bit states; `paged=True`: PagedAdamW8bit)
adafactor  transformers Adafactor with an explicit lr (no relative step, factored second moment)
lion       Lion (Chen et al. 2023), one fp32 momentum; DeepSpeedCPULion when offloading
sgd        torch SGD with momentum 0.9

The schedule is a pure function of the step (linear warmup, cosine decay to min_lr_ratio·lr), so
resuming needs no scheduler state and every engine gets the same lr.
"""
from __future__ import annotations

import math

import torch

from shardtrain.compiler.specs import Optimizer


class Lion(torch.optim.Optimizer):
    """Lion: update = sign(β1·m + (1-β1)·g); m ← β2·m + (1-β2)·g; decoupled weight decay.
    Plain tensor ops, so it works on DTensor shards (FSDP2) and DeepSpeed flat partitions."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                update = m.mul(b1).add_(p.grad, alpha=1 - b1).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def build_optimizer(name: Optimizer, params, *, lr: float, weight_decay: float = 0.0,
                    offload: bool = False, paged: bool = False):
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters (LoRA targets matched nothing?)")
    if offload:
        if name is Optimizer.ADAMW:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
        if name is Optimizer.LION:
            from deepspeed.ops.lion import DeepSpeedCPULion
            return DeepSpeedCPULion(params, lr=lr, weight_decay=weight_decay)
        raise ValueError(f"optimizer {name.value}: ZeRO-Offload needs a DeepSpeed CPU optimizer; use adamw or lion")
    if name is Optimizer.ADAMW:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name is Optimizer.ADAMW8BIT:
        import bitsandbytes as bnb
        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    if name is Optimizer.ADAFACTOR:
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    if name is Optimizer.LION:
        return Lion(params, lr=lr, weight_decay=weight_decay)
    if name is Optimizer.SGD:
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """lr for optimizer step `step` (0-based): linear warmup to lr, cosine to min_ratio·lr at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
