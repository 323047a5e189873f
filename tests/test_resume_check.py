"""Issue 21 (2) + issue 22: the run-dir check on resume is "what the checkpoint depends on"
(shardtrain.launcher.resume_check), not an allow-list. File-level and fast: real configs compiled by the
real planner, run dirs written by the real rundir module, no processes."""
from __future__ import annotations

from pathlib import Path

import pytest

from shardtrain.config.schema import ConfigError
from shardtrain.launcher import resume_check
from shardtrain.launcher.rundir import prepare_run_dir

ROOT = Path(__file__).resolve().parents[1]
RAW = {"model": {"name": "tiny-llama"}, "hardware": {"nodes": 1, "gpus_per_node": 2},
       "train": {"seq_len": 64, "global_batch": 8, "micro_batch": 2, "precision": "fp32", "steps": 10,
                 "strategy": "ddp"},
       "data": {"train": "demo"}, "run": {"device": "cpu"}}


@pytest.fixture
def run_dir(tmp_path):
    d = prepare_run_dir(RAW, {}, tmp_path / "r")
    (d / "checkpoints" / "step_5").mkdir(parents=True)
    (d / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 6.0}\n')
    return d


@pytest.mark.parametrize("over", [
    {"hardware.gpus_per_node": 1},                                    # 2 -> 1 ranks
    {"hardware.nodes": 2},                                            # 2 -> 4 ranks
    {"train.strategy": "zero3"},                                      # DDP -> ZeRO-3
    {"train.strategy": "fsdp_full_shard", "hardware.gpus_per_node": 1},
    {"train.micro_batch": 1},                                         # accumulation adjusts
    {"train.precision": "bf16"},                                      # the stored masters are fp32
    {"run.memory_trace": True}, {"run.log_every": 3}, {"run.keep_checkpoints": 5},  # diagnostics, cadence
    {"train.grad_clip": 0.5}, {"train.weight_decay": 0.1}, {"lora.dropout": 0.1},  # hyper-parameters
])
def test_execution_changes_resume(run_dir, over, capsys):
    prepare_run_dir(RAW, over, run_dir)
    out = capsys.readouterr().out
    assert (run_dir / "checkpoints" / "step_5").is_dir()
    if any(k.startswith(("hardware.", "train.strategy", "train.micro_batch", "train.precision")) for k in over):
        assert "[shardtrain] re-planned for the resume:" in out, out
    else:
        assert "re-planned" not in out


def test_replanned_line_names_what_changed(run_dir, capsys):
    prepare_run_dir(RAW, {"hardware.gpus_per_node": 1, "train.strategy": "zero2"}, run_dir)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "re-planned" in ln)
    assert "ranks 2 → 1" in line and "strategy ddp → zero2" in line and "accumulation 2 → 4" in line, line


@pytest.mark.parametrize("over, key", [
    ({"train.optimizer": "lion"}, "train.optimizer"),
    ({"train.method": "lora"}, "train.method"),
    ({"train.seq_len": 128}, "train.seq_len"),
    ({"train.global_batch": 16}, "train.global_batch"),
    ({"train.seed": 1}, "train.seed"),
    ({"data.packing": False}, "data.packing"),
    ({"data.eval_fraction": 0.2}, "data.eval_fraction"),
    ({"model.name": str(ROOT / "configs" / "models" / "tiny-llama.json")}, "model.name"),
])
def test_what_the_checkpoint_depends_on_is_refused(run_dir, over, key):
    before = (run_dir / "run.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        prepare_run_dir(RAW, over, run_dir)
    msg = str(e.value)
    lines = msg.splitlines()
    assert "\\n" not in msg and len(lines) >= 3  # real line breaks, one change per line
    assert any(ln.strip().startswith(f"{key}:") for ln in lines), msg
    assert "--no-resume" in lines[-1]
    assert (run_dir / "run.yaml").read_text() == before  # nothing was rewritten


def test_a_changed_schedule_warns_in_one_line(run_dir, capsys):
    prepare_run_dir(RAW, {"train.steps": 40}, run_dir)
    warn = [ln for ln in capsys.readouterr().out.splitlines() if "LR schedule" in ln]
    assert len(warn) == 1 and "train.steps 10 → 40" in warn[0] and warn[0].startswith("[shardtrain] warning:")
    prepare_run_dir(RAW, {"train.steps": 40}, run_dir)  # the same again: nothing changed, no warning
    assert "LR schedule" not in capsys.readouterr().out


def test_lora_shape_is_part_of_the_checkpoint(tmp_path):
    lora = {**RAW, "train": {**RAW["train"], "method": "lora"}, "lora": {"rank": 8}}
    d = prepare_run_dir(lora, {}, tmp_path / "r")
    (d / "metrics.jsonl").write_text("{}\n")
    prepare_run_dir(lora, {"lora.dropout": 0.0, "hardware.gpus_per_node": 1}, d)  # allowed
    for over in ({"lora.rank": 16}, {"lora.alpha": 64}, {"lora.targets": ["q_proj"]}):
        with pytest.raises(ConfigError, match=next(iter(over))):
            prepare_run_dir(lora, over, d)


def test_plan_choices_are_compared_too():
    """The planner may pick another optimizer or method itself (allow_optimizer_change): the plan's
    effective value counts, whatever the config says."""
    old = {"method": "full", "optimizer": "adamw", "global_batch_size": 8, "seq_len": 64, "world_size": 2}
    new = {**old, "optimizer": "adamw8bit", "world_size": 1}
    got = resume_check.check({}, {}, old, new)
    assert got.refused == ("plan optimizer: 'adamw' → 'adamw8bit'",)
    assert got.replanned == "re-planned for the resume: ranks 2 → 1"
