"""Issue 18: the planner searches the device mesh (compiler/mesh.py, planner.py, mesh_reasons.py).

The acceptance cases of the issue (8B at seq 262,144 on one node of 8 × 80 GB; a global batch of 256 on
1,024 GPUs), forced dims, the one-line refusals, and the mesh's path through `plan --json`, the OOM
re-plan and the resume check."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shardtrain.compiler.planner import PlanningError, plan
from shardtrain.compiler.specs import (CpMode, HardwareSpec, Method, ParallelDims, ParallelRequest, Strategy,
                                       TrainSpec)
from shardtrain.config.presets import load_model_spec

L8B = load_model_spec("llama-3.1-8b")
L70B = load_model_spec("llama-3.1-70b")
NODE = HardwareSpec(nodes=1, gpus_per_node=8)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardtrain", *args], capture_output=True, text=True, timeout=120)


def test_8b_at_262k_tokens_fits_one_node_by_sharing_the_sequence():
    """Without a mesh (tp = cp = 1) one 262,144-token sequence per GPU does not fit 80 GB (nor does a global
    batch of 1 spread over 8 GPUs); on auto the planner shares the sequence across ranks and says why."""
    t = TrainSpec(seq_len=262_144, global_batch_size=1)
    with pytest.raises(PlanningError):
        plan(L8B, NODE, TrainSpec(seq_len=262_144, global_batch_size=1, parallel=ParallelRequest(tp=1, cp=1)))
    p = plan(L8B, NODE, t)
    m = p.parallel
    assert p.chosen.fits and m.world == 8 and m.tp * m.cp == 8 and m.dp == 1
    assert p.chosen.per_gpu.total <= p.gpu_memory_bytes - p.headroom_bytes
    assert any(r.startswith(f"mesh {m.label()}") for r in p.reasons), p.reasons
    assert any("global batch of 1 cannot spread over 8 GPUs" in r for r in p.reasons), p.reasons
    if m.cp > 1:
        assert any(f"each rank holds {262_144 // m.cp:,} of the 262,144 tokens" in r for r in p.reasons)
    j = p.to_json()["parallel"]
    assert (j["tp"], j["cp"], j["dp"], j["world_size"]) == (m.tp, m.cp, 1, 8)


def test_global_batch_256_on_1024_gpus_finds_a_mesh():
    hw = HardwareSpec(nodes=128, gpus_per_node=8)
    p = plan(L70B, hw, TrainSpec(seq_len=8192, global_batch_size=256))
    m = p.parallel
    assert p.chosen.fits and m.world == 1024 and 256 % m.dp == 0 and m.tp * m.cp >= 4
    c = p.chosen
    assert c.micro_batch_size * c.grad_accum_steps * m.dp == 256
    assert any("global batch of 256 cannot spread over 1,024 GPUs" in r for r in p.reasons), p.reasons


def test_forced_dims_are_kept_and_the_rest_is_searched():
    p = plan(L8B, NODE, TrainSpec(seq_len=4096, global_batch_size=32, parallel=ParallelRequest(tp=2)))
    assert p.parallel.tp == 2 and p.parallel.world == 8
    for a in p.alternatives:
        assert a.mesh.tp == 2
    p = plan(L8B, HardwareSpec(nodes=2, gpus_per_node=8),
             TrainSpec(seq_len=4096, global_batch_size=64, strategy=Strategy.FSDP_FULL_SHARD,
                       parallel=ParallelRequest(dp_replicate=2, tp=1, cp=1)))
    assert (p.parallel.dp_replicate, p.parallel.dp_shard) == (2, 8) and p.parallel.is_hsdp
    assert any("HSDP" in r for r in p.reasons)


@pytest.mark.parametrize("train, fragment", [
    (TrainSpec(parallel=ParallelRequest(tp=3)), "parallel: tp 3 does not divide the 8 GPUs"),
    (TrainSpec(strategy=Strategy.ZERO3, parallel=ParallelRequest(tp=2)), "AutoTP runs with ZeRO-1/2 only"),
    (TrainSpec(strategy=Strategy.ZERO2, parallel=ParallelRequest(cp=2, cp_mode=CpMode.RING)),
     "DeepSpeed has Ulysses sequence parallel only"),
    (TrainSpec(strategy=Strategy.DDP, parallel=ParallelRequest(tp=2)), "ddp replicates the whole model"),
    (TrainSpec(parallel=ParallelRequest(cp=16, cp_mode=CpMode.ULYSSES), seq_len=4096),
     "parallel: cp 16 does not divide the 8 GPUs"),
    (TrainSpec(parallel=ParallelRequest(cp=4), seq_len=4098), "train.seq_len 4098 is not a multiple of cp 4"),
    (TrainSpec(method=Method.QLORA, parallel=ParallelRequest(tp=2)), "QLoRA's 4-bit weights"),
    (TrainSpec(parallel=ParallelRequest(cp=2, cp_mode=CpMode.RING), seq_len=4098, global_batch_size=8),
     "ring cp 2 needs train.seq_len % 4 == 0"),
])
def test_illegal_forced_meshes_are_one_line_with_the_fix(train, fragment):
    with pytest.raises(PlanningError) as e:
        plan(L8B, NODE, train)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg, msg


def test_tp_must_divide_the_heads():
    with pytest.raises(PlanningError, match="tp 16 does not divide the 32 attention heads and 8 kv heads: use tp in "
                                            r"\[1, 2, 4, 8\]"):
        plan(L8B, HardwareSpec(nodes=2, gpus_per_node=8), TrainSpec(parallel=ParallelRequest(tp=16)))


def test_cli_flags_table_and_json_show_the_mesh():
    r = _cli("plan", "--model", "llama-3.1-8b", "--gpus-per-node", "8", "--tp", "2", "--dp-shard", "4",
             "--seq-len", "4096", "--global-batch", "32")
    assert r.returncode == 0, r.stderr
    assert "mesh       dp_shard 4 × tp 2  (dp_replicate 1 × dp_shard 4 × cp 1 × tp 2 = 8 ranks)" in r.stdout
    assert "× 4 data-parallel ranks" in r.stdout
    r = _cli("plan", "--model", "llama-3.1-8b", "--gpus-per-node", "8", "--tp", "2", "--dp-shard", "4",
             "--seq-len", "4096", "--global-batch", "32", "--json", "--full-json")
    j = json.loads(r.stdout)
    assert j["parallel"] == {"dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 2, "cp_mode": "ulysses",
                             "world_size": 8, "dp": 4, "fsdp_shard": 4}
    assert j["spec"]["train"]["parallel"]["tp"] == 2
    r = _cli("plan", "--model", "llama-3.1-8b", "--gpus-per-node", "8", "--tp", "3")
    assert r.returncode != 0 and "tp 3 does not divide the 8 GPUs" in r.stderr and "Traceback" not in r.stderr


def test_old_plans_read_as_their_strategy_mesh():
    p = plan(load_model_spec("llama-3.2-1b"), NODE, TrainSpec(seq_len=2048, global_batch_size=64,
                                                               strategy=Strategy.DDP))
    d = p.to_json()
    for c in [d, *d["alternatives"]]:
        c.pop("parallel", None)
    d["spec"]["train"].pop("parallel")
    from shardtrain.compiler.plan import Plan
    back = Plan.from_json(d)
    assert back.parallel == ParallelDims(dp_replicate=8)
    assert back.train.parallel.is_auto


def test_oom_replan_keeps_tp_and_cp():
    """A re-plan after an OOM changes one thing at a time, not how layers or sequences are split."""
    from shardtrain.config.pipeline import compile as compile_config
    from shardtrain.launcher import oom
    cfg, p = compile_config(None, {"model.name": "llama-3.1-8b", "hardware.gpus_per_node": 8, "parallel.tp": 2,
                                   "train.seq_len": 4096, "train.global_batch": 32, "train.micro_batch": 2})
    assert p.parallel.tp == 2
    r = oom.next_plan(cfg, p, [{"rank": 0, "phase": "backward", "step": 1}])
    assert r is not None and r.plan.parallel.tp == 2 and r.plan.parallel.cp == p.parallel.cp


def test_resume_check_names_a_mesh_change():
    from shardtrain.launcher.resume_check import check
    a = plan(L8B, NODE, TrainSpec(seq_len=4096, global_batch_size=32, parallel=ParallelRequest(tp=2, cp=1)))
    b = plan(L8B, NODE, TrainSpec(seq_len=4096, global_batch_size=32, parallel=ParallelRequest(tp=1, cp=1)))
    cfg = {"model": {"name": "llama-3.1-8b"}}
    rc = check(cfg, cfg, a.to_json(), b.to_json())
    assert not rc.refused and rc.replanned and f"mesh {a.parallel.label()} → {b.parallel.label()}" in rc.replanned
