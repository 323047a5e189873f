"""Acceptance: accumulation with no_sync equals one K-times larger batch, and gradient all-reduces
per optimizer step drop from K to 1 (DDP comm hook); FSDP2's set_requires_gradient_sync likewise
drops reduce-scatters from K to 1 per unit (counted by wrapping dist.reduce_scatter_single)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import STEPS

pytestmark = pytest.mark.multiproc
K = 2  # 8 = micro 2 × accumulation 2 × 2 ranks


def plan_of(res) -> dict:
    return json.loads((Path(res["run_dir"]) / "plan.json").read_text())


def test_plans_accumulate(torch_results):
    assert plan_of(torch_results["ddp"])["grad_accum_steps"] == K
    assert plan_of(torch_results["ddp_big_batch"])["grad_accum_steps"] == 1


def test_no_sync_equals_big_batch(torch_results):
    a = load_file(str(Path(torch_results["ddp"]["run_dir"]) / "final" / "model.safetensors"))
    b = load_file(str(Path(torch_results["ddp_big_batch"]["run_dir"]) / "final" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5
    assert torch_results["ddp"]["losses"] == pytest.approx(torch_results["ddp_big_batch"]["losses"], rel=1e-6)


def test_ddp_allreduce_once_per_step(torch_results):
    """Rounds of bucket all-reduces = distinct micro-steps in whose backward the hook ran."""
    on, off = torch_results["ddp"]["probe"], torch_results["ddp_no_nosync"]["probe"]
    assert sorted(set(on["micro_of_call"])) == [K * s for s in range(1, STEPS + 1)]   # once per step
    assert sorted(set(off["micro_of_call"])) == list(range(1, K * STEPS + 1))         # K times per step
    assert off["hook_calls"] > on["hook_calls"] > 0
    assert torch_results["ddp_no_nosync"]["losses"] == pytest.approx(torch_results["ddp"]["losses"], rel=1e-6)


def test_fsdp2_reduce_scatter_once_per_step(torch_results):
    every, deferred = torch_results["fsdp_full_shard"]["probe"], torch_results["fsdp_defer"]["probe"]
    units = every["units"]
    assert units == 3  # 2 decoder layers + root
    assert every["reduce_scatters"] == K * STEPS * units
    assert deferred["reduce_scatters"] == STEPS * units
    assert deferred["units"] == units
