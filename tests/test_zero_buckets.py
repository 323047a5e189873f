"""ZeRO reduce/all-gather bucket sizes (compiler/memory.py ZeroBuckets, issue 11): HF's h² rule raised
to DDP's 25 MiB bucket (fp32 elements) for small models, capped by the trainable parameters, h² kept
for offload; the emitted ds_config carries exactly the buckets the memory model assumed. DeepSpeed's
real allocation at these sizes is checked by tests/test_truth_engines.py and
tests/runtime/test_peak_truth.py (they use the plan's buckets)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardtrain.cli import main
from shardtrain.compiler.memory import MIN_BUCKET_ELEMENTS

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "examples" / "tiny-cpu.yaml")


def _plan(capsys, *args) -> dict:
    assert main(["plan", TINY, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _emitted_zero(tmp_path, *args) -> dict:
    out = tmp_path / "emitted"
    assert main(["emit", TINY, "--out", str(out), *args]) == 0
    return json.loads((out / "ds_config.json").read_text())["zero_optimization"]


def test_small_full_model_gets_one_bucket_of_all_its_params(capsys, tmp_path):
    d = _plan(capsys, "--strategy", "zero2")
    n, h = d["model"]["num_params"], 128
    assert h * h < n < MIN_BUCKET_ELEMENTS  # tiny-llama: 0.43M params, hidden 128
    assert d["zero_buckets"]["reduce_bucket_elements"] == n == d["zero_buckets"]["allgather_bucket_elements"]
    z = _emitted_zero(tmp_path, "--strategy", "zero2")
    assert z["reduce_bucket_size"] == n and z["allgather_bucket_size"] == n


def test_lora_bucket_is_capped_by_the_adapters(capsys, tmp_path):
    args = ("--strategy", "zero2", "--method", "lora")
    d = _plan(capsys, *args)
    t = d["model"]["trainable_params"]
    assert 128 * 128 < t < d["model"]["num_params"]  # rank-16 adapters: 65,536 of 426,624
    assert d["zero_buckets"]["reduce_bucket_elements"] == t == _emitted_zero(tmp_path, *args)["reduce_bucket_size"]


@pytest.mark.parametrize("strategy", ["zero2_offload", "zero3_offload"])
def test_offload_keeps_h_squared(capsys, tmp_path, strategy):
    d = _plan(capsys, "--strategy", strategy)
    assert d["zero_buckets"]["reduce_bucket_elements"] == 128 * 128
    assert _emitted_zero(tmp_path, "--strategy", strategy)["reduce_bucket_size"] == 128 * 128


@pytest.mark.parametrize("model,h,want", [("llama-3.1-8b", 4096, 4096 * 4096),  # h² already above the floor
                                          ("llama-3.2-1b", 2048, MIN_BUCKET_ELEMENTS)])
def test_large_models(capsys, model, h, want):
    d = _plan(capsys, "--model", model, "--strategy", "zero2", "--gpus-per-node", "8", "--gpu", "h100-80gb",
              "--precision", "bf16")
    assert d["zero_buckets"]["reduce_bucket_elements"] == want
