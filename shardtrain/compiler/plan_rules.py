"""What the planner refuses before it evaluates anything (pure): the exceptions it raises, the combinations
of strategy, optimizer, method and precision no engine runs (``illegal_reason``), forced settings the runner
cannot run (``runner_refusal``), the micro batches a global batch allows (``micro_batch_options``) and the
message for a forced mesh that matches no rank count (``no_mesh_text``). Split out of compiler/planner.py,
which re-exports ``PlanningError``, ``NoFitError``, ``illegal_reason`` and ``micro_batch_options``."""
from __future__ import annotations

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.runner import runner_path
from shardtrain.compiler.specs import (Engine, GradCkpt, HardwareSpec, LossMode, Method, OffloadDevice, Optimizer,
                                       ParallelRequest, Precision, Strategy, TrainSpec)

MAX_AUTO_MICRO_BATCH = 64


class PlanningError(ValueError):
    """Bad input for planning: the message says what to change."""


class NoFitError(PlanningError):
    """Nothing fits; carries the least-memory plan so callers can still show it."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message)
        self.plan = plan


def illegal_reason(strategy: Strategy, optimizer: Optimizer, method: Method, precision: Precision,
                   hw: HardwareSpec) -> str | None:
    """Why this combination cannot run (with the fix), or None. Mirrors engine constraints."""
    off = strategy.offload_optimizer if strategy.engine is Engine.DEEPSPEED else OffloadDevice.NONE
    if off is not OffloadDevice.NONE and optimizer not in (Optimizer.ADAMW, Optimizer.LION):
        name = {Optimizer.ADAMW8BIT: "8-bit AdamW"}.get(optimizer, optimizer.value)
        return (f"{name} cannot run with ZeRO-Offload ({strategy.value}): DeepSpeed offloads only to its "
                f"CPU optimizers; set optimizer: adamw (DeepSpeedCPUAdam) or a strategy without offload")
    if off is OffloadDevice.NVME and optimizer is not Optimizer.ADAMW:
        return "ZeRO-Infinity swaps only DeepSpeedCPUAdam states: set optimizer: adamw"
    if strategy is Strategy.ZERO_INFINITY and not hw.nvme_path:
        return "zero_infinity needs an NVMe directory: set hardware.nvme_path (--nvme-path)"
    if strategy.engine is Engine.FSDP and optimizer is Optimizer.ADAMW8BIT:
        return ("bitsandbytes 8-bit optimizers do not handle FSDP2 DTensor shards: use a ZeRO "
                "strategy or DDP with adamw8bit, or optimizer: adamw with FSDP")
    if method is Method.QLORA and strategy.offload_params is not OffloadDevice.NONE and strategy.engine is Engine.DEEPSPEED:
        return "QLoRA's 4-bit weights cannot be offloaded by ZeRO-3 param offload: use zero3 or zero2_offload"
    if precision.is_bf16 and not hw.supports_bf16:
        return f"{hw.gpu_name} has no bf16: set precision: fp16"
    if precision is Precision.BF16_PURE and strategy.engine is Engine.DEEPSPEED:
        # DeepSpeed 0.19.8 has a pure-bf16 mode (bf16.bf16_master_weights_and_grads + bf16_optimizer_states),
        # but it keeps a separate bf16 master partition next to the module's bf16 params: not modelled here
        return (f"precision bf16_pure is planned for DDP and FSDP2 only, not DeepSpeed ({strategy.value}): "
                f"set strategy: ddp / fsdp_full_shard, or precision: bf16")
    return None


def runner_refusal(train: TrainSpec) -> str | None:
    """A forced setting the runner cannot run (compiler/runner.py), with the fix."""
    rp = runner_path(train.runner, train.runner_transformers)
    if train.loss is LossMode.CHUNKED and not rp.chunked_loss:
        return (f"train.loss: chunked cannot run under runner {train.runner.value}: it computes the loss inside the "
                "model (HF ForCausalLMLoss); use loss: auto or full, or runner: shardtrain")
    if train.grad_ckpt is GradCkpt.OP and not rp.op_ckpt:
        return (f"train.grad_ckpt: op cannot run under runner {train.runner.value} (it checkpoints whole layers); "
                "use grad_ckpt: auto, full or selective, or runner: shardtrain")
    return None


def micro_batch_options(train: TrainSpec, hw: HardwareSpec, dp: int | None = None) -> list[int]:
    """Micro batches that make global = micro × accumulation × data-parallel size exact. ``dp``: the
    mesh's data-parallel ranks (tp and cp peers share samples); default every rank."""
    dp = hw.world_size if dp is None else dp
    g = train.global_batch_size
    if g % dp:
        lo, hi = (g // dp) * dp, (g // dp + 1) * dp
        near = " or ".join(str(x) for x in (lo, hi) if x > 0)
        raise PlanningError(
            f"train.global_batch: {g} is not a multiple of the {dp} data-parallel ranks "
            f"(global = micro × accumulation × {dp}); use {near}, or change nodes/gpus_per_node, or let tp/cp "
            "ranks share samples (parallel.tp / parallel.cp)")
    per_rank = g // dp
    if train.micro_batch_size is not None:
        if per_rank % train.micro_batch_size:
            divs = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
            raise PlanningError(
                f"train.micro_batch: {train.micro_batch_size} does not divide the {per_rank} samples per rank "
                f"(global_batch {g} / {dp} ranks); use one of {divs} or micro_batch: auto, or set "
                f"global_batch to a multiple of {train.micro_batch_size * dp}")
        return [train.micro_batch_size]
    return [d for d in range(1, min(per_rank, MAX_AUTO_MICRO_BATCH) + 1) if per_rank % d == 0]


def no_mesh_text(req: ParallelRequest, hw: HardwareSpec) -> str:
    forced = {k: v for k, v in req.to_json().items() if isinstance(v, int)}
    prod = 1
    for v in forced.values():
        prod *= v
    if hw.world_size % prod:
        dims = " × ".join(f"{k} {v}" for k, v in forced.items())
        return (f"parallel: {dims} does not divide the {hw.world_size} GPUs (nodes × gpus_per_node): "
                "choose dims whose product divides it, or leave them auto")
    return (f"no mesh of {hw.world_size} ranks matches parallel: {_req_text(req)} (cp must divide train.seq_len "
            "and, with auto dims, tp ≤ 8 dividing the heads, cp ≤ 32): leave a dim auto or change it")


def _req_text(req: ParallelRequest) -> str:
    return ", ".join(f"{k} {v.value if hasattr(v, 'value') else v}" for k, v in req.to_json().items()
                     if v is not None) or "auto"
