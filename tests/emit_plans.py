"""Plans for the emit tests: any forced strategy × optimizer × precision × method, on a model that
fits (tiny-llama by default), for any world size. Planning is pure and fast (no torch)."""
from __future__ import annotations

import dataclasses
import itertools

from shardtrain.compiler.planner import NoFitError, illegal_reason, plan
from shardtrain.compiler.specs import Method, Optimizer, ParallelDims, Precision, Strategy
from shardtrain.config.resolve import resolve_specs
from shardtrain.config.schema import parse_run_config

DS_STRATEGIES = (Strategy.ZERO1, Strategy.ZERO2, Strategy.ZERO3, Strategy.ZERO2_OFFLOAD,
                 Strategy.ZERO3_OFFLOAD, Strategy.ZERO_INFINITY)
FSDP_STRATEGIES = (Strategy.FSDP_FULL_SHARD, Strategy.FSDP_SHARD_GRAD_OP, Strategy.FSDP_HYBRID_SHARD)


def make_plan(strategy: Strategy | str = "auto", *, optimizer: str = "adamw", precision: str = "bf16",
              method: str = "full", model: str = "tiny-llama", nodes: int = 1, gpus_per_node: int = 1,
              global_batch: int | None = None, micro_batch: int | str = 1, seq_len: int = 128,
              nvme_path: str | None = "/tmp/shardtrain-nvme", grad_ckpt: str = "auto", gpu: str | None = None,
              mesh: dict | None = None, parallel: dict | None = None):
    """``parallel``: the run config's `parallel:` section; by default tp 1 and cp 1, so these plans keep the
    strategy's 1-D mesh whatever the planner's mesh search prefers. ``mesh``: ParallelDims keyword arguments
    put on the chosen candidate (dataclasses.replace), with the accumulation re-derived so that global batch
    = micro × accumulation × dp still holds."""
    p = _plan(strategy, optimizer=optimizer, precision=precision, method=method, model=model, nodes=nodes,
              gpus_per_node=gpus_per_node, global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len,
              nvme_path=nvme_path, grad_ckpt=grad_ckpt, gpu=gpu,
              parallel={"tp": 1, "cp": 1} if parallel is None else parallel)
    return p if mesh is None else with_mesh(p, ParallelDims(**mesh))


def with_mesh(p, mesh: ParallelDims):
    c = p.chosen
    assert mesh.world == c.world_size, f"mesh {mesh.label()} is not world {c.world_size}"
    accum, rest = divmod(p.train.global_batch_size, c.micro_batch_size * mesh.dp)
    assert rest == 0 and accum >= 1, f"global batch {p.train.global_batch_size} does not spread over {mesh.label()}"
    return dataclasses.replace(p, chosen=dataclasses.replace(c, parallel=mesh, grad_accum_steps=accum))


def _plan(strategy, *, optimizer, precision, method, model, nodes, gpus_per_node, global_batch, micro_batch, seq_len,
          nvme_path, grad_ckpt, gpu, parallel):
    world = nodes * gpus_per_node
    hw = {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpu_memory": "80GiB"}
    if gpu:
        hw = {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpu": gpu}
    if nvme_path:
        hw["nvme_path"] = nvme_path
    raw = {"model": {"name": model}, "hardware": hw,
           "train": {"strategy": str(strategy), "optimizer": optimizer, "precision": precision, "method": method,
                     "global_batch": global_batch or 2 * world, "micro_batch": micro_batch, "seq_len": seq_len,
                     "grad_ckpt": grad_ckpt}, "parallel": parallel}
    m, h, t = resolve_specs(parse_run_config(raw))
    try:
        return plan(m, h, t)
    except NoFitError as e:  # still a complete plan, forced strategy
        return e.plan


def legal_matrix(strategies=DS_STRATEGIES, methods=("full", "lora")):
    """(strategy, optimizer, precision, method) combinations the planner accepts, plus the illegal ones."""
    legal, illegal = [], []
    for s, o, p, m in itertools.product(strategies, Optimizer, Precision, methods):
        if m == "qlora" and p is Precision.FP32:
            continue
        if p is Precision.BF16_PURE:   # refused on every DeepSpeed strategy whatever the rest (tests/test_pure_bf16.py)
            continue
        why = illegal_reason(s, o, Method(m), p, resolve_specs(parse_run_config(
            {"model": {"name": "tiny-llama"}, "hardware": {"nvme_path": "/tmp/x"}}))[1])
        (illegal if why else legal).append((s, o, p, m))
    return legal, illegal
