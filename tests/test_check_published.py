"""`shardtrain check` on DeepSpeed configs published by popular fine-tuning projects
(tests/fixtures/check/published/, see SOURCES.md): every file the HF Trainer + DeepSpeed's own parser
accept gets no error, without --trainer (the "auto" values make it a Trainer template); a file DeepSpeed
rejects (loss-scaling keys inside bf16) still fails. The judges are code no one here wrote: transformers'
HfTrainerDeepSpeedConfig fills the "auto" values exactly as the Trainer does, then DeepSpeedConfig parses."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from shardtrain.cli import main

PUB = Path(__file__).parent / "fixtures" / "check" / "published"
FILES = sorted(PUB.glob("*/*.json"))


def trainer_then_deepspeed(path: Path, tmp_path: Path, world: int = 1):
    """What a Trainer run does with the file: fill "auto" from TrainingArguments, then DeepSpeed parses."""
    import deepspeed.runtime.config as dsc
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    cfg = json.loads(path.read_text())
    bf16 = (cfg.get("bf16") or {}).get("enabled") is True  # the Trainer insists its flag matches the file
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             report_to=[], bf16=bf16, use_cpu=True)
    hf = HfTrainerDeepSpeedConfig(cfg)
    hf.trainer_config_process(args)
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=64))
    hf.trainer_config_finalize(args, model, num_training_steps=10)
    old = dsc.dist
    dsc.dist = types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: world)
    try:
        return dsc.DeepSpeedConfig(json.loads(json.dumps(hf.config)))
    finally:
        dsc.dist = old


def check_json(path: Path, *extra: str, capsys) -> tuple[int, list[dict]]:
    code = main(["check", str(path), "--json", *extra])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_published_configs_deepspeed_accepts_have_no_errors(tmp_path, capsys):
    assert len(FILES) >= 8
    for path in FILES:
        trainer_then_deepspeed(path, tmp_path)  # raises if DeepSpeed (after the Trainer) refuses the file
        code, out = check_json(path, capsys=capsys)
        errors = [o for o in out if o["severity"] == "error"]
        assert code == 0 and not errors, (path.name, errors)
        assert out[0]["severity"] == "info" and "Trainer template" in out[0]["message"], out[0]
        assert "train_batch_size" in out[0]["fix"]  # lists what the Trainer fills
        assert all(set(o) == {"file", "key", "severity", "message", "fix"} for o in out)


def test_aliases_are_accepted_and_ignored_blocks_are_warnings(capsys):
    # axolotl writes pydantic field names (max_live_parameters), DeepSpeed's aliases are stage3_*: both valid
    _, out = check_json(PUB / "axolotl" / "zero3_bf16_cpuoffload_all.json", capsys=capsys)
    assert not [o for o in out if "max_live" in o["key"] or "gather_16bit" in o["key"]]
    # LLaMA-Factory's comms_config / monitor_config: DeepSpeed never reads them -> warnings, no bad rename
    _, out = check_json(PUB / "llama-factory" / "ds_z3_config.json", capsys=capsys)
    warn = {o["key"]: o for o in out if o["severity"] == "warning"}
    assert {"comms_config", "monitor_config"} <= set(warn)
    assert "rename" not in warn["comms_config"]["fix"]


def test_loss_scaling_inside_bf16_still_fails(tmp_path, capsys):
    bad = PUB / "bf16_loss_scale.json"
    with pytest.raises(Exception):
        trainer_then_deepspeed(bad, tmp_path)
    code, out = check_json(bad, capsys=capsys)
    keys = {o["key"] for o in out if o["severity"] == "error"}
    assert code == 1 and {"bf16.loss_scale", "bf16.initial_scale_power"} <= keys, out


def test_target_deepspeed_forces_a_plain_check(capsys):
    code, out = check_json(PUB / "axolotl" / "zero2.json", "--target", "deepspeed", capsys=capsys)
    assert code == 1 and "train_batch_size" in {o["key"] for o in out if o["severity"] == "error"}
