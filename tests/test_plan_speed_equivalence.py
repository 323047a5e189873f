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

import dataclasses
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


def test_no_tiled_mlp_on_a_tp_mesh():
    """The runtime refuses a tiled MLP with parallel.tp > 1 (runtime/modeling.py, DeepSpeed AutoTP too): auto
    never tiles on a tp mesh; a forced tiled MLP with a forced tp is one line; a forced tiled MLP with tp
    auto plans only meshes without tp."""
    from shardtrain.compiler.planner import PlanningError
    from shardtrain.compiler.savers import saver_options
    from shardtrain.compiler.specs import ParallelDims
    model, hw = load_model_spec("llama-3.1-8b"), HardwareSpec(nodes=1, gpus_per_node=8)
    long = TrainSpec(seq_len=262_144, global_batch_size=1)
    assert {sv.tiles for sv in saver_options(model, long, ParallelDims(cp=2, tp=4))} == {1}
    assert max(sv.tiles for sv in saver_options(model, long, ParallelDims(cp=8))) > 1
    # forced tp 4, tiles auto, 1M tokens: nothing fits; before the rule the zero3 alternative was a
    # 128-tile MLP on the tp mesh
    from shardtrain.compiler.planner import NoFitError
    with pytest.raises(NoFitError) as nofit:
        plan(model, hw, dataclasses.replace(long, seq_len=1 << 20, parallel=ParallelRequest(tp=4)))
    p = nofit.value.plan
    assert p.parallel.tp == 4 and len(p.alternatives) >= 1
    assert all(c.tiled_mlp_tiles == 1 for c in (p.chosen, *p.alternatives))
    with pytest.raises(PlanningError) as e:
        plan(model, hw, TrainSpec(tiled_mlp=4, parallel=ParallelRequest(tp=2)))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train.tiled_mlp: 4 cannot run with tensor parallel (parallel.tp 2)")
    forced = plan(model, hw, dataclasses.replace(long, tiled_mlp=4))
    assert forced.chosen.tiled_mlp_tiles == 4 and forced.parallel.tp == 1
    assert all(c.mesh.tp == 1 for c in (forced.chosen, *forced.alternatives))


@pytest.mark.parametrize("lie", [True, False])
def test_a_wrong_probe_never_makes_the_answer(monkeypatch, lie):
    """If a probe ever disagreed with plan() at the edge, find_max searches again planning every value in
    full instead of answering from the probe."""
    import shardtrain.compiler.maxfit as maxfit
    model, hw, train = load_model_spec("llama-3.1-8b"), HardwareSpec(nodes=1, gpus_per_node=1), TrainSpec()
    want = find_max(model, hw, train, MaxKey.SEQ_LEN, planner=lambda m, h, t: plan(m, h, t))
    monkeypatch.setattr(maxfit, "first_fit", lambda *a, **k: ("pair",) if lie else None)
    got = find_max(model, hw, train, MaxKey.SEQ_LEN)
    assert got.to_json() == want.to_json() and got.plan.to_json() == want.plan.to_json()
