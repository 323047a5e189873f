"""A plan on a given device mesh, for tracing it: the planner with the mesh forced (TrainSpec.parallel),
and, while the planner does not yet honour a forced mesh, its chosen candidate re-evaluated by the
analytic model on that mesh (compiler/planner.py evaluate_phases with `parallel=`, the same call the
planner makes per candidate). Pure compiler calls; no torch."""
from __future__ import annotations

import dataclasses

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import HardwareSpec, ParallelDims, ParallelRequest, TrainSpec


def _planned(model, hw: HardwareSpec, train: TrainSpec) -> Plan:
    from shardtrain.compiler.planner import NoFitError, plan
    try:
        return plan(model, hw, train)
    except NoFitError as e:          # a plan that does not fit is still traceable
        return e.plan


def plan_on_mesh(model, hw: HardwareSpec, train: TrainSpec, parallel: ParallelDims) -> Plan:
    """The plan whose chosen candidate runs on `parallel` (world = hw.world_size), with the analytic
    phases of that mesh (compiler/phases.py via planner.evaluate_phases)."""
    if parallel.world != hw.world_size:
        raise ValueError(f"parallel: {parallel.label()} is {parallel.world} ranks, the hardware has "
                         f"{hw.world_size}; make the dims multiply to the GPU count")
    req = ParallelRequest(dp_replicate=parallel.dp_replicate, dp_shard=parallel.dp_shard, cp=parallel.cp,
                          tp=parallel.tp, cp_mode=parallel.cp_mode)
    p = _planned(model, hw, dataclasses.replace(train, parallel=req))
    if p.chosen.parallel == parallel:
        return p
    return _reevaluated(p, parallel)


def _reevaluated(p: Plan, parallel: ParallelDims) -> Plan:
    """The chosen candidate's analytic phases recomputed on `parallel` (same micro batch, checkpointing,
    optimizer, method, loss path, tiled MLP tiles, checkpoint offload; accumulation from global = micro × accum × dp)."""
    from shardtrain.compiler.inventory import tensor_inventory
    from shardtrain.compiler.planner import evaluate_phases
    c, t = p.chosen, p.train
    accum = t.global_batch_size // (c.micro_batch_size * parallel.dp)
    groups = tensor_inventory(p.model, c.method, t.lora.rank, tuple(p.lora_targets) or t.lora.targets)
    _ms, phases, peak = evaluate_phases(
        p.model, p.hardware, t, groups, c.strategy, method=c.method, optimizer=c.optimizer,
        micro=c.micro_batch_size, ckpt=c.gradient_checkpointing, defer=c.fsdp_defer_grad_sync, loss=c.loss,
        act_offload=c.activation_offload, parallel=parallel, tiles=c.tiled_mlp_tiles, ckpt_offload=c.ckpt_offload)
    chosen = dataclasses.replace(c, parallel=parallel, grad_accum_steps=accum, per_gpu=phases[peak],
                                 per_phase=tuple(phases.items()), peak_phase=peak)
    return dataclasses.replace(p, chosen=chosen)
