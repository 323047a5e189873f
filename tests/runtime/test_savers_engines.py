"""The savers on every engine (issue 20 points 2-3, issue 19 `grad_ckpt: op`): ONE 2-rank gloo launch
(tests/runtime/driver.py) trains the tiny Llama 2 steps (accumulation 2) per scenario, each against its
reference with the same config but the saver off:
- tiled MLP (plan.chosen.tiled_mlp_tiles 4) on DDP, FSDP2, ZeRO-1/2/3 and LoRA (adapters on the MLP) on
  ZeRO-3: losses and gradient norms within 1e-6 relative (every parameter gradient, LoRA's included, is
  compared in process, test_tiled_mlp.py);
- checkpoint offload (plan.chosen.ckpt_offload) composed with op-level SAC or the tiled MLP: op SAC alone
  is bitwise equal to full checkpointing and offload bitwise equal to none (in process:
  test_op_sac.py, test_ckpt_offload.py), so these runs must equal the full-checkpointing reference;
- all three under Ulysses context parallel (cp 2; FSDP2's all-to-all and DeepSpeed ZeRO-3's ALST): each
  rank tiles its own token slice;
- every run's worker log names the savers that are on (one line).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import run_driver
from rundirs import edit_plan

pytestmark = pytest.mark.multiproc

TOL = 1e-6
MLP_LORA = {"targets": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], "dropout": 0.0, "rank": 4}


def _over(strategy: str, grad_ckpt: str = "full", lora: bool = False) -> dict:
    over = {"train": {"strategy": strategy, "precision": "fp32", "steps": 2, "grad_ckpt": grad_ckpt,
                      "tiled_mlp": "off", "ckpt_offload": "off"}}
    if lora:
        over["train"].update(method="lora", lr=1e-2)
        over["lora"] = MLP_LORA
    return over


def _savers(tiles: int = 1, offload: bool = False, cp: int = 1):
    """plan_edit: the savers as plan.chosen carries them; `cp`: Ulysses over the 2 ranks (dp 1: the same
    global batch of 8 in 4 micro-steps of 2)."""
    from shardtrain.compiler.specs import ParallelDims

    def f(p):
        c = dataclasses.replace(p.chosen, tiled_mlp_tiles=tiles, ckpt_offload=offload)
        if cp > 1:
            c = dataclasses.replace(c, parallel=ParallelDims(cp=cp), grad_accum_steps=8 // c.micro_batch_size)
        return dataclasses.replace(p, chosen=c)

    def edit(d: Path):
        edit_plan(d, f)
    return edit


# name -> (config overrides, plan edit or None, reference scenario or None)
SCENARIOS = {
    "ddp": (_over("ddp"), None, None),
    "ddp_tiled": (_over("ddp"), _savers(tiles=4), "ddp"),
    "ddp_op_offload": (_over("ddp", "op"), _savers(offload=True), "ddp"),
    "fsdp": (_over("fsdp_full_shard"), None, None),
    "fsdp_tiled": (_over("fsdp_full_shard"), _savers(tiles=4), "fsdp"),
    "fsdp_op_offload": (_over("fsdp_full_shard", "op"), _savers(offload=True), "fsdp"),
    "fsdp_cp2": (_over("fsdp_full_shard"), _savers(cp=2), None),
    "fsdp_cp2_savers": (_over("fsdp_full_shard", "op"), _savers(tiles=4, offload=True, cp=2), "fsdp_cp2"),
    "zero1": (_over("zero1"), None, None),
    "zero1_tiled": (_over("zero1"), _savers(tiles=4), "zero1"),
    "zero2": (_over("zero2"), None, None),
    "zero2_tiled_offload": (_over("zero2"), _savers(tiles=4, offload=True), "zero2"),
    # ALST's setup: ZeRO-3 + DeepSpeed's Ulysses (sequence_parallel_size 2) + tiled MLP + checkpoint offload
    "zero3_cp2": (_over("zero3"), _savers(cp=2), None),
    "zero3_cp2_savers": (_over("zero3", "op"), _savers(tiles=4, offload=True, cp=2), "zero3_cp2"),
    "lora_zero3": (_over("zero3", lora=True), None, None),
    "lora_zero3_tiled": (_over("zero3", lora=True), _savers(tiles=4), "lora_zero3"),
}


@pytest.fixture(scope="session")
def savers_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("rt_savers")
    sc = [{"name": n, "over": over, **({"plan_edit": edit} if edit else {})}
          for n, (over, edit, _) in SCENARIOS.items()]
    return run_driver(base, sc)


def _grad_norms(res: dict) -> list[float]:
    rows = [json.loads(line) for line in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in rows if r.get("kind") == "train"]


def _savers_line(res: dict) -> str:
    log = (Path(res["run_dir"]) / "logs" / "worker_rank0.log").read_text()
    return next(line for line in log.splitlines() if "memory savers:" in line)


@pytest.mark.parametrize("name", [n for n, (_, _, ref) in SCENARIOS.items() if ref])
def test_equal_to_the_reference(savers_results, name):
    got, want = savers_results[name], savers_results[SCENARIOS[name][2]]
    assert len(got["losses"]) == 2
    assert got["losses"] == pytest.approx(want["losses"], rel=TOL)
    assert _grad_norms(got) == pytest.approx(_grad_norms(want), rel=TOL)


def test_worker_logs_the_savers(savers_results):
    assert "tiled MLP off" in _savers_line(savers_results["ddp"])
    assert "checkpoint offload off" in _savers_line(savers_results["ddp"])
    assert "activation checkpointing full (2 layers)" in _savers_line(savers_results["ddp"])
    assert "tiled MLP 4 tiles (2 layers)" in _savers_line(savers_results["zero1_tiled"])
    line = _savers_line(savers_results["fsdp_op_offload"])
    assert "op-level selective" in line and "checkpointed layer inputs in host memory" in line
    assert "(pinned)" not in line   # CPU: no pinned memory
