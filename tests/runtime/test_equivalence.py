"""Acceptance: after N fp32 steps every engine (DDP, FSDP2 full / shard-grad-op, ZeRO-1/2/3, ZeRO-2/3
with CPU offload) reaches the loss and the parameters of a single-process reference."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DS_STRATEGIES, STEPS
from reference import reference_run

pytestmark = pytest.mark.multiproc

LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-5   # lr 1e-3 × 4 steps moves weights by up to 4e-3: this is < 1% of the update


@pytest.fixture(scope="module")
def reference(torch_results):
    return reference_run(Path(torch_results["ddp"]["run_dir"]))


def train_losses(run_dir) -> list[float]:
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def check_against(reference, run_dir):
    ref_losses, ref_sd = reference
    losses = train_losses(run_dir)
    assert len(losses) == STEPS
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert losses[-1] < losses[0] - 0.1, "the loss must go down"
    sd = load_file(str(Path(run_dir) / "final" / "model.safetensors"))
    assert set(sd) == set(ref_sd)
    worst = max((sd[k].float() - ref_sd[k].float()).abs().max().item() for k in sd)
    moved = max((ref_sd[k].float() - v.float()).abs().max().item() for k, v in sd.items())
    assert worst < PARAM_ATOL, f"max |param - reference| = {worst:.3g}"
    return worst, moved


@pytest.mark.parametrize("name", ["ddp", "ddp_big_batch", "fsdp_full_shard", "fsdp_defer", "fsdp_shard_grad_op",
                                  "fsdp_offload"])
def test_torch_engines_match_reference(torch_results, reference, name):
    check_against(reference, torch_results[name]["run_dir"])


@pytest.mark.parametrize("name", DS_STRATEGIES)
def test_deepspeed_matches_reference(ds_results, reference, name):
    check_against(reference, ds_results[name]["run_dir"])


def test_reference_really_trains(reference):
    losses, _ = reference
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.isfinite(torch.tensor(losses)))
