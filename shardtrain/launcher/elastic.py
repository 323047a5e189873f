"""`shardtrain launch --min-nodes M` (issue 21 (3)): when a node is lost for good, go on with the nodes left.

torchrun runs with ``--nnodes M:N`` (elastic c10d rendezvous): after a failure its agents restart the
workers (``--max-restarts``), and when a node does not come back the rendezvous closes with the nodes
that are left (at least M, after torchrun's last-call wait). Those workers find a world size their
plan.json was not compiled for, so the launch compiles, BEFORE it starts, the plan for every smaller
world the job may shrink to (M .. N-1 nodes, the same config: the planner re-decides micro batch,
accumulation and — unless the config forces one — strategy for the smaller world; the global batch is a
config key and stays) and writes them to ``plans/world{W}.json``. A restarted worker takes the plan of
its world size (runtime/build.py) and resumes from the last portable checkpoint (runtime/portable.py).
The deepspeed launcher has no elastic node range (only DeepSpeed's own elasticity config, which changes
the batch), so ``--min-nodes`` runs DeepSpeed plans under torchrun, as ``--max-restarts`` does.
A Slurm job requeued on fewer nodes re-plans at its start instead (the run-dir check allows it).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from shardtrain import rundir_format as rf
from shardtrain.compiler.specs import Launcher


def check(min_nodes: int | None, nnodes: int, max_restarts: int) -> None:
    """ValueError (one line, the fix) for a --min-nodes that cannot work."""
    if min_nodes is None:
        return
    if not 1 <= min_nodes <= nnodes:
        raise ValueError(f"--min-nodes {min_nodes}: must be between 1 and the job's {nnodes} node(s) (--nnodes / "
                         "hardware.nodes)")
    if min_nodes < nnodes and max_restarts < 1:
        raise ValueError(f"--min-nodes {min_nodes}: going on with fewer nodes is a restart; give --max-restarts N "
                         "(N >= 1) as well")


def launcher_for(flag: str | None, chosen: Launcher, min_nodes: int | None, nnodes: int) -> Launcher:
    """torchrun for an elastic node range (the deepspeed launcher has none); a forced deepspeed is refused."""
    chosen = Launcher(chosen)
    if min_nodes is None or min_nodes >= nnodes or chosen is not Launcher.DEEPSPEED:
        return chosen
    if flag == Launcher.DEEPSPEED:
        raise ValueError("--min-nodes: the deepspeed launcher has no elastic node range; drop --launcher deepspeed "
                         "(torchrun runs DeepSpeed plans and shrinks the job) or --min-nodes")
    return Launcher.TORCHRUN


def smaller_plans(cfg, min_nodes: int) -> list[tuple[int, object, object]]:
    """(nodes, RunConfig, Plan) for every node count from min_nodes to hardware.nodes - 1."""
    from shardtrain.config import pipeline
    out = []
    for n in range(min_nodes, cfg.hardware.nodes):
        c, p = pipeline.compile(cfg, {"hardware.nodes": n})
        out.append((n, c, p))
    return out


def describe(p) -> str:
    c = p.chosen
    return (f"{c.world_size} ranks: {p.strategy.value}, micro batch {c.micro_batch_size} × accumulation "
            f"{c.grad_accum_steps}" + ("" if c.fits else " (does NOT fit: the job cannot go on there)"))


def write_plans(run_dir: Path, cfg, min_nodes: int | None) -> list[str]:
    """Write plans/world{W}.json for every smaller world (removing stale ones); one line per plan."""
    from shardtrain.launcher.rundir import plan_with_facts
    d = Path(run_dir) / rf.ELASTIC_PLANS_DIR
    shutil.rmtree(d, ignore_errors=True)
    if min_nodes is None or min_nodes >= cfg.hardware.nodes:
        return []
    d.mkdir(parents=True)
    lines = []
    for n, c, p in smaller_plans(cfg, min_nodes):
        lines.append(f"if {cfg.hardware.nodes - n} node(s) are lost: {n} node(s), {describe(p)}")
        if not p.chosen.fits:
            continue
        full = plan_with_facts(c, p)
        tmp = d / f".{rf.elastic_plan_name(p.chosen.world_size)}.tmp"
        tmp.write_text(rf.json_text(full.to_json()))
        tmp.replace(d / rf.elastic_plan_name(p.chosen.world_size))
    return lines
