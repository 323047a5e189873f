"""The representative jobs of tests/test_plan_speed_equivalence.py (shared with its golden generator).

Each job is (name, model preset, HardwareSpec kwargs, TrainSpec kwargs, --max key or None). The golden
tests/golden/plan_speed_equivalence.json holds, per job, the plan JSON (chosen + alternatives + reasons)
or the NoFit plan / error line, and for --max jobs the MaxResult JSON — recorded from the planner before
its speed work (issue 20 point 1's speed acceptance) so every later change must give the same answers.
Regenerate (only after a deliberate modelling change, with the diff read): SHARDTRAIN_REGEN_GOLDEN=1.
"""
from __future__ import annotations

from shardtrain.compiler.specs import (CkptOffload, GradCkpt, HardwareSpec, LoraSpec, Method, ParallelRequest,
                                       Strategy, TrainSpec)

JOBS = [
    ("8b-1x8-default", "llama-3.1-8b", dict(nodes=1, gpus_per_node=8), dict(), None),
    ("8b-1x8-max-seq", "llama-3.1-8b", dict(nodes=1, gpus_per_node=8), dict(), "seq-len"),
    ("8b-1x1-max-seq", "llama-3.1-8b", dict(nodes=1, gpus_per_node=1), dict(), "seq-len"),
    ("8b-1x8-max-micro", "llama-3.1-8b", dict(nodes=1, gpus_per_node=8), dict(), "micro-batch"),
    ("8b-2x8-max-global", "llama-3.1-8b", dict(nodes=2, gpus_per_node=8), dict(), "global-batch"),
    ("8b-1x8-seq256k", "llama-3.1-8b", dict(nodes=1, gpus_per_node=8), dict(seq_len=262_144, global_batch_size=1),
     None),
    ("8b-1x8-zero3-tp2", "llama-3.1-8b", dict(nodes=1, gpus_per_node=8),
     dict(strategy=Strategy.ZERO3, parallel=ParallelRequest(tp=2)), None),
    ("8b-1x8-zero2-tp2", "llama-3.1-8b", dict(nodes=1, gpus_per_node=8),
     dict(strategy=Strategy.ZERO2, parallel=ParallelRequest(tp=2)), None),
    ("8b-1x1-24gb-seq8k", "llama-3.1-8b", dict(nodes=1, gpus_per_node=1, gpu_memory_bytes=24 * 2**30),
     dict(seq_len=8192, global_batch_size=8), None),
    ("8b-1x1-lora-max-micro", "llama-3.1-8b", dict(nodes=1, gpus_per_node=1), dict(method=Method.LORA),
     "micro-batch"),
    ("8b-1x8-forced-tiles-max-seq", "llama-3.1-8b", dict(nodes=1, gpus_per_node=8),
     dict(tiled_mlp=4, ckpt_offload=CkptOffload.CPU, grad_ckpt=GradCkpt.FULL), "seq-len"),
    ("70b-64x8-gb2048", "llama-3.1-70b", dict(nodes=64, gpus_per_node=8, nvme_path="/nvme",
                                              nvme_capacity_bytes=3_500_000_000_000),
     dict(seq_len=4096, global_batch_size=2048), None),
    ("70b-1x8-full", "llama-3.1-70b", dict(nodes=1, gpus_per_node=8), dict(), None),
    ("70b-1x8-lora-max-seq", "llama-3.1-70b", dict(nodes=1, gpus_per_node=8), dict(method=Method.LORA), "seq-len"),
    ("70b-1x1-qlora", "llama-3.1-70b", dict(nodes=1, gpus_per_node=1),
     dict(method=Method.QLORA, lora=LoraSpec(rank=64), global_batch_size=16), None),
    ("70b-4x8-cp4-max-seq", "llama-3.1-70b", dict(nodes=4, gpus_per_node=8), dict(parallel=ParallelRequest(cp=4)),
     "seq-len"),
    ("405b-128x8-gb256", "llama-3.1-405b", dict(nodes=128, gpus_per_node=8), dict(seq_len=8192, global_batch_size=256),
     None),
    ("405b-128x8-max-seq", "llama-3.1-405b", dict(nodes=128, gpus_per_node=8), dict(), "seq-len"),
    ("405b-4x8-qlora-max-micro", "llama-3.1-405b", dict(nodes=4, gpus_per_node=8),
     dict(method=Method.QLORA), "micro-batch"),
]


def run_job(name: str, preset: str, hw_kw: dict, train_kw: dict, max_key: str | None) -> dict:
    """The job's answer as JSON: {"plan": ...} / {"nofit": ..., "plan": ...} / {"error": ...}, plus "max"."""
    from shardtrain.compiler.maxfit import MaxKey, NothingFitsError, find_max
    from shardtrain.compiler.planner import NoFitError, PlanningError, plan
    from shardtrain.config.presets import load_model_spec
    model, hw, train = load_model_spec(preset), HardwareSpec(**hw_kw), TrainSpec(**train_kw)
    try:
        if max_key is None:
            return {"plan": plan(model, hw, train).to_json()}
        r = find_max(model, hw, train, MaxKey(max_key))
        return {"plan": r.plan.to_json(), "max": r.to_json()}
    except NothingFitsError as e:
        return {"nothing_fits": str(e)}
    except NoFitError as e:
        return {"nofit": str(e), "plan": e.plan.to_json()}
    except PlanningError as e:
        return {"error": str(e)}
