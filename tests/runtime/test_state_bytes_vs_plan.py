"""Acceptance: the per-rank model-state bytes the worker measures on the real engine objects equal
the plan's prediction within 2%, term by term (params, grads, master params, optimizer states) and
for what ZeRO-Offload keeps on the host."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


pytestmark = pytest.mark.multiproc
TOL = 0.02
"""The plan may be at most 2% above the measured bytes ..."""
TOL_UNDER = 0.005
"""... and at most 0.5% below (issue 19: an under-prediction is an OOM on a GPU; 0.5% covers what no
plan term holds, e.g. the 4-byte step counters of the optimizer state)."""


def _within(measured: int, predicted: int) -> bool:
    return -TOL_UNDER * max(measured, 1) <= predicted - measured <= TOL * max(predicted, 1)
TERMS = ("params", "grads", "master_params", "optimizer_states")


def reports(res) -> list[dict]:
    """Every rank's memory report (the world size is the launch's: 2 here, 4 in test_zero1_accum_world4)."""
    d = Path(res["run_dir"])
    world = json.loads((d / "plan.json").read_text())["world_size"]
    return [json.loads((d / f"memory_rank{r}.json").read_text()) for r in range(world)]


def check(res, *, host=True):
    """The plan predicts the fullest rank (ZeRO-1/2 partitions differ by rank): compare it with the
    per-term maximum over the ranks."""
    reps = reports(res)
    for k in TERMS:
        p, m = reps[0]["predicted"][k], max(r["measured"][k] for r in reps)
        assert _within(m, p), f"{k}: measured {[r['measured'][k] for r in reps]} vs predicted {p}"
    if host:
        p, m = reps[0]["predicted_offloaded"], max(sum(r["offloaded"].values()) for r in reps)
        assert _within(m, p), f"offloaded: measured {m} vs predicted {p}"


@pytest.mark.parametrize("name", ["bf16_ddp", "bf16_fsdp_full_shard", "bf16_fsdp_shard_grad_op", "ddp",
                                  "fsdp_full_shard", "ddp_adamw8bit", "fsdp_offload", "bf16_fsdp_offload"])
def test_torch_engines(torch_results, name):
    check(torch_results[name])


def test_fsdp_deferred_sync_holds_unsharded_grads(torch_results):
    """set_requires_gradient_sync(False) keeps unsharded fp32 grads (4·T) between micro-steps. They
    are reduce-scattered unit by unit in the last backward and freed, and the sharded grads of the
    previous step are gone (zero_grad), so the peak is ~4·T — the memory model's defer term adds the
    4·T/N sharded grads on top (conservative by 4·T/N). The test forced the flag into plan.json, so
    the defer prediction is re-derived here."""
    from shardtrain.compiler.inventory import tensor_inventory
    from shardtrain.compiler.memory import model_state_bytes
    from shardtrain.compiler.plan import Plan
    d = Path(torch_results["fsdp_defer"]["run_dir"])
    plan = Plan.from_json(json.loads((d / "plan.json").read_text()))
    c = plan.chosen
    groups = tensor_inventory(plan.model, c.method)
    ms = model_state_bytes(plan.model, groups, c.strategy, plan.hardware, method=c.method, precision=c.precision,
                           optimizer=c.optimizer, fsdp_defer_grad_sync=True)
    reps = reports(torch_results["fsdp_defer"])
    unsharded = 4 * c.trainable_params
    assert max(r["measured"]["grads"] for r in reps) == pytest.approx(unsharded, rel=TOL)
    assert ms.grads == pytest.approx(unsharded + unsharded / c.world_size, rel=TOL)
    assert max(r["measured"]["params"] for r in reps) == pytest.approx(ms.params, rel=TOL)


@pytest.mark.parametrize("name", ["bf16_zero1", "bf16_zero2", "bf16_zero3", "bf16_zero3_offload",
                                  "bf16_zero2_offload_accum1", "bf16_zero2_adamw8bit", "bf16_zero3_lora",
                                  "zero1", "zero3", "zero3_offload", "zero3_opt_offload", "bf16_zero3_opt_offload"])
def test_deepspeed(ds_results, name):
    check(ds_results[name])


# Accumulation 2 (global batch 8 = micro 2 x 2 x 2 ranks). The offload runs keep h^2 buckets, so the
# embedding, lm_head and MLP weights are larger than the bucket: off the accumulation boundary their
# in-partition gradients stay on the device until the epilogue and every in-partition gradient gets a
# host accumulator (memory.zero2_offload_accum_grads; this was a strict xfail: device grads 3.5x the
# model). "zero2" (no offload) has buckets holding every tensor (issue 11);
# tests/runtime/test_zero2_large_grad.py covers tensors larger than the bucket without offload.
@pytest.mark.parametrize("name", ["bf16_zero2_offload", "zero2", "zero2_offload"])
def test_deepspeed_zero2_with_accumulation(ds_results, name):
    check(ds_results[name])


@pytest.mark.parametrize("name", ["bf16_lora_ddp", "qlora_ddp", "qlora_zero2", "qlora_fsdp_offload"])
def test_lora_qlora(lora_results, name):
    check(lora_results[name])


def test_table_written(torch_results):
    table = (Path(torch_results["bf16_ddp"]["run_dir"]) / "logs" / "memory_table.txt").read_text()
    assert "predicted" in table and "measured" in table and "optimizer_states" in table
