"""Issue 22: the default learning rate depends on the method (train.lr: auto): full fine-tuning 1e-5 (the
repo's own 8B full example; LLaMA-Factory's full SFT recipe), LoRA/QLoRA 2e-4 (the repo's LoRA example; axolotl's
LoRA/QLoRA recipes). `method: full` without lr used to get 3e-4 in the emitted DeepSpeed config. The resolved
number is what run.yaml, both DeepSpeed JSONs, trainer_args.json and the README carry; an explicit lr wins."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from shardtrain.cli import main
from shardtrain.config.schema import ConfigError, default_lr, parse_run_config
from shardtrain.compiler.specs import Method

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"name": "tiny-llama"}}


def test_default_by_method_and_explicit_wins():
    assert {m: parse_run_config({**BASE, "train": {"method": m.value}}).train.lr for m in Method} == \
        {Method.FULL: 1e-5, Method.LORA: 2e-4, Method.QLORA: 2e-4}
    assert parse_run_config({**BASE, "train": {"lr": "auto", "method": "lora"}}).train.lr == default_lr(Method.LORA)
    assert parse_run_config({**BASE, "train": {"lr": 3e-4}}).train.lr == 3e-4
    assert parse_run_config(BASE, {"train.lr": "5e-5"}).train.lr == 5e-5
    for bad in ("fast", -1, 0):
        with pytest.raises(ConfigError, match="train.lr"):
            parse_run_config({**BASE, "train": {"lr": bad}})


def test_repo_examples_agree_with_the_defaults():
    """The defaults are the rates the repo's own full and LoRA examples chose."""
    full = yaml.safe_load((ROOT / "configs/examples/llama3-8b-full-8x80gb.yaml").read_text())
    lora = yaml.safe_load((ROOT / "configs/examples/llama3-8b-lora-1x24gb.yaml").read_text())
    assert float(full["train"]["lr"]) == default_lr(Method.FULL)
    assert float(lora["train"]["lr"]) == default_lr(Method.LORA)


@pytest.mark.parametrize("method,lr", [("full", 1e-5), ("lora", 2e-4)])
def test_emitted_files_carry_the_resolved_lr(tmp_path, capsys, method, lr):
    out = tmp_path / method
    assert main(["emit", "--model", "tiny-llama", "--gpus-per-node", "2", "--gpu-memory", "80GiB", "--strategy",
                 "zero2", "--method", method, "--out", str(out)]) == 0
    assert f"learning rate {lr:g} (the {method} default; set train.lr to change it)" in capsys.readouterr().err
    assert yaml.safe_load((out / "run.yaml").read_text())["train"]["lr"] == lr  # what the worker reads
    assert json.loads((out / "ds_config.json").read_text())["optimizer"]["params"]["lr"] == lr
    assert json.loads((out / "hf_ds_config.json").read_text())["optimizer"]["params"]["lr"] == "auto"
    assert json.loads((out / "trainer_args.json").read_text())["learning_rate"] == lr
    assert f"Learning rate {lr:g} (the default for {method}" in (out / "README.md").read_text()
    runtime = json.loads((out / "plan.json").read_text())["runtime"]  # the facts the ranks compare with
    assert json.dumps(runtime).count(f'"lr": {lr}') >= 1


def test_explicit_lr_is_not_called_a_default(tmp_path):
    out = tmp_path / "x"
    assert main(["emit", "--model", "tiny-llama", "--gpus-per-node", "1", "--gpu-memory", "80GiB", "--strategy", "ddp",
                 "--set", "train.lr=3e-5", "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert "Learning rate 3e-05," in text and "the default for" not in text
