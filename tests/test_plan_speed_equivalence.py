"""Planning speed work (issue 20 point 1: `plan --max` interactive) changes no answer.

The golden tests/golden/plan_speed_equivalence.json was recorded from the planner at commit 07a42a7, before
the speed work (memoised pure functions, `plan --max`'s probes through planner.plan_fits): for each job of
tests/plan_equivalence_jobs.py (8B/70B/405B; full, LoRA, QLoRA; 1 to 1,024 GPUs; forced and auto strategy
and mesh; plain plans, a no-fit, a refusal and --max seq-len / micro-batch / global-batch) the plan JSON
(chosen, alternatives, reasons, per-phase bytes) and the --max result must be identical. A deliberate
modelling change regenerates it (SHARDTRAIN_REGEN_GOLDEN=1) and says why in its commit.

Independent of the golden: find_max through the probes equals find_max planning every value in full, and
plan_fits agrees with plan() on both sides of a --max edge. Timings are benchmarks/plan_speed.py's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from plan_equivalence_jobs import JOBS, run_job
from shardtrain.compiler.maxfit import MaxKey, find_max, train_at
from shardtrain.compiler.planner import plan, plan_fits
from shardtrain.compiler.specs import HardwareSpec, ParallelRequest, TrainSpec
from shardtrain.config.presets import load_model_spec

GOLDEN = Path(__file__).parent / "golden" / "plan_speed_equivalence.json"


def _golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


@pytest.mark.parametrize("job", JOBS, ids=[j[0] for j in JOBS])
def test_plan_json_unchanged(job):
    got = json.loads(json.dumps(run_job(*job)))
    if os.environ.get("SHARDTRAIN_REGEN_GOLDEN"):
        gold = _golden()
        gold[job[0]] = got
        GOLDEN.write_text(json.dumps(gold, indent=1, sort_keys=True) + "\n")
        return
    want = _golden()[job[0]]
    assert got.keys() == want.keys()
    if "max" in want:
        assert got["max"] == want["max"]
    if "plan" in want:
        assert got["plan"]["alternatives"] == want["plan"]["alternatives"]
        assert got["plan"]["reasons"] == want["plan"]["reasons"]
    assert got == want


@pytest.mark.parametrize("preset,hw,train,key", [
    ("llama-3.1-8b", HardwareSpec(nodes=1, gpus_per_node=1), TrainSpec(), MaxKey.SEQ_LEN),
    ("llama-3.1-70b", HardwareSpec(nodes=4, gpus_per_node=8), TrainSpec(parallel=ParallelRequest(cp=4)),
     MaxKey.SEQ_LEN),
    ("llama-3.1-8b", HardwareSpec(nodes=1, gpus_per_node=2), TrainSpec(), MaxKey.MICRO_BATCH),
])
def test_probes_equal_full_plans(preset, hw, train, key):
    model = load_model_spec(preset)
    fast = find_max(model, hw, train, key)
    slow = find_max(model, hw, train, key, planner=lambda m, h, t: plan(m, h, t))  # every value in full
    assert fast.to_json() == slow.to_json()
    assert fast.plan.to_json() == slow.plan.to_json()
    assert fast.plans_made == slow.plans_made
    # the edge: plan_fits says what plan() says on both sides
    assert plan_fits(model, hw, train_at(key, fast.value, hw, train))
    assert not plan_fits(model, hw, train_at(key, fast.next_value, hw, train))
