"""Optimizers and the learning-rate schedule.

adamw      torch.optim.AdamW (fp32 states, 8 B/param); DeepSpeedCPUAdam when ZeRO offloads the optimizer
adamw8bit  bitsandbytes AdamW8bit (block-wise 8-bit states; `paged=True`: PagedAdamW8bit)
adafactor  Adafactor as torch.optim.Adafactor (factored second moment, no first moment), applied to
           each rank's shard under FSDP2 (torch's and transformers' reject DTensor)
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


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class Adafactor(torch.optim.Optimizer):
    """torch.optim.Adafactor's algorithm (Shazeer & Stern 2018; beta2_t = 1 - t^-0.8, relative step
    rho_t = min(lr, 1/sqrt(t)) scaled by max(eps2, RMS(param)), update clipped to RMS d) on local
    tensors: an FSDP2 DTensor shard is factored on its own (rows of the shard + all columns), as the
    memory model counts it. States of DTensor params are DTensors (DCP saves them per rank)."""

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay))

    @staticmethod
    def _like(p, local):
        if hasattr(p, "to_local"):
            from torch.distributed.tensor import DTensor
            return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False)
        return local

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                x, g = _local(p), _local(p.grad)
                eps1_ = torch.finfo(x.dtype).eps if eps1 is None else eps1
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    if x.dim() > 1:
                        st["row_var"] = self._like(p, x.new_zeros(x.shape[:-1]))
                        st["col_var"] = self._like(p, x.new_zeros(x.shape[:-2] + (1,) + x.shape[-1:]))
                    else:
                        st["variance"] = self._like(p, torch.zeros_like(x))
                st["step"] += 1
                t = float(st["step"])
                beta2 = 1 - t ** group["beta2_decay"]
                rho = min(group["lr"], 1 / t ** 0.5)
                alpha = max(eps2, float(x.norm(2)) / (x.numel() ** 0.5)) * rho
                if group["weight_decay"]:
                    x.mul_(1 - group["lr"] * group["weight_decay"])
                g2 = g.float().square().add_(eps1_)
                if x.dim() > 1:
                    row, col = _local(st["row_var"]), _local(st["col_var"])
                    row.lerp_(g2.mean(dim=-1), 1 - beta2)
                    col.lerp_(g2.mean(dim=-2, keepdim=True), 1 - beta2)
                    var = row.unsqueeze(-1) * col / row.mean(dim=-1, keepdim=True).unsqueeze(-1)
                else:
                    var = _local(st["variance"])
                    var.lerp_(g2, 1 - beta2)
                update = g.float() / var.clamp_min(eps1_).sqrt()
                update.div_((update.norm(2) / (update.numel() ** 0.5) / group["d"]).clamp_min(1.0))
                x.add_(update.to(x.dtype), alpha=-alpha)
        return loss


#: devices with a fused AdamW kernel (torch/utils/_foreach_utils.py _get_fused_kernels_supported_devices)
_FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


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
        # The fused kernel (torch/optim/adamw.py _fused_adamw -> aten::_fused_adamw_, CPU and CUDA): one
        # pass over each tensor, in place, so no temporaries (compiler/phases.py counts none) and 5x faster
        # than the per-tensor loop on CPU (benchmarks/profile_step.py). The HF Trainer's default with
        # torch >= 2.8 (transformers/training_args.py: adamw_torch_fused), and torchtitan's.
        fused = all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params) or None
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name is Optimizer.ADAMW8BIT:
        import bitsandbytes as bnb
        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    if name is Optimizer.ADAFACTOR:
        return Adafactor(params, lr=lr, weight_decay=weight_decay)
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
