"""The `trainer` flavour: "auto" only where the HF Trainer fills values, everything else explicit, and
transformers' own DeepSpeed integration (TrainingArguments(deepspeed=dict) -> trainer_config_process,
then trainer_config_finalize) accepts it with the matching TrainingArguments from trainer_arguments()
— no mismatch, no "auto" left. A mismatching TrainingArguments is caught by transformers itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emit_plans import make_plan
from shardtrain.emit.check import check_deepspeed, find_auto_keys
from shardtrain.emit.deepspeed import TRAINER_AUTO_KEYS, deepspeed_config, trainer_arguments

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

CASES = [
    {"name": "zero1-adamw", "plan": {"strategy": "zero1"}},
    {"name": "zero2-adamw-ckpt", "plan": {"strategy": "zero2", "grad_ckpt": "full"}},
    {"name": "zero3-adamw-fp32", "plan": {"strategy": "zero3", "precision": "fp32"}},
    {"name": "zero3-lion-offload", "plan": {"strategy": "zero3_offload", "optimizer": "lion"}},
    {"name": "zero2-adamw8bit", "plan": {"strategy": "zero2", "optimizer": "adamw8bit"}},
    {"name": "zero3-adafactor-selective", "plan": {"strategy": "zero3", "optimizer": "adafactor",
                                                   "grad_ckpt": "selective"}},
    {"name": "zero_infinity", "plan": {"strategy": "zero_infinity"}},
    {"name": "zero2-fp16-sgd", "plan": {"strategy": "zero2", "precision": "fp16", "optimizer": "sgd"}},
    {"name": "mismatch-micro-batch", "plan": {"strategy": "zero2", "global_batch": 4},
     "override": {"per_device_train_batch_size": 2}},
    {"name": "mismatch-bf16", "plan": {"strategy": "zero2"}, "override": {"bf16": False}},
]


def test_autos_only_where_the_trainer_fills():
    for case in CASES:
        cfg = deepspeed_config(make_plan(**case["plan"]), trainer=True)
        autos = set(find_auto_keys(cfg))
        assert autos and autos <= TRAINER_AUTO_KEYS, autos - TRAINER_AUTO_KEYS
        # batch sizes and precision stay explicit: the plan's memory fit depends on them
        assert isinstance(cfg["train_micro_batch_size_per_gpu"], int)
        assert not [f for f in check_deepspeed(cfg, consumer="trainer") if f.severity == "error"]
        assert [f for f in check_deepspeed(cfg) if "auto" in f.problem]  # but not outside the Trainer


def test_trainer_arguments_match_the_plan():
    plan = make_plan("zero3", grad_ckpt="selective", optimizer="adamw8bit", global_batch=8)
    kw = trainer_arguments(plan, lr=1e-4)
    assert kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 8
    assert kw["activation_checkpointing_kwargs"] == {"use_reentrant": False, "every_n_layers": 2}
    assert kw["optim"] == "adamw_bnb_8bit" and kw["learning_rate"] == 1e-4 and kw["bf16"]


@pytest.mark.multiproc
def test_transformers_accepts_trainer_flavour(tmp_path):
    cases = [dict(c) for c in CASES]
    cases[1]["train"] = True  # one real Trainer.train() step (zero2 + checkpointing)
    for c in cases:
        c["plan"] = {"nvme_path": str(tmp_path / "nvme"), **c["plan"]}
    f, out = tmp_path / "cases.json", tmp_path / "out.json"
    f.write_text(json.dumps(cases))
    r = subprocess.run([sys.executable, str(ROOT / "tests/trainer_check.py"), str(f), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    res = json.loads(out.read_text())
    for c in cases:
        got = res[c["name"]]
        if c["name"].startswith("mismatch"):
            assert got["mismatch"] and "mismatch" in got["mismatch"], got
        else:
            assert got["mismatch"] is None and got["autos_left"] == [], (c["name"], got)
    assert 0 < res[cases[1]["name"]]["loss"] < 20
