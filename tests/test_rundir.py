"""The run directory (shardtrain.launcher.rundir): contents, emitted configs, resume/idempotence rules.

No processes are started here; everything is file-level and fast.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.planner import PlanningError
from shardtrain.config.pipeline import compile as compile_config
from shardtrain.config.schema import ConfigError, parse_run_config
from shardtrain.launcher import rundir
from shardtrain.launcher.rundir import prepare_run_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "examples" / "tiny-cpu.yaml"
RAW = {"model": {"name": "tiny-llama"}, "hardware": {"nodes": 1, "gpus_per_node": 2},
       "train": {"seq_len": 64, "global_batch": 8, "precision": "fp32", "steps": 10},
       "run": {"device": "cpu"}}


def _fake_state(d: Path) -> None:
    (d / "checkpoints" / "step_5").mkdir(parents=True)
    (d / "checkpoints" / "step_5" / "state.pt").write_bytes(b"x" * 16)
    (d / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 6.0}\n')


def test_example_config_prepares_a_complete_run_dir(tmp_path):
    d = prepare_run_dir(str(TINY), {"train.steps": 20}, tmp_path / "run")
    assert d == (tmp_path / "run").absolute()
    cfg = yaml.safe_load((d / "run.yaml").read_text())
    assert cfg["train"]["steps"] == 20 and cfg["model"]["name"] == "tiny-llama"
    parse_run_config(cfg)  # the resolved config is itself a valid run config
    plan = json.loads((d / "plan.json").read_text())
    assert "spec" in plan and plan["world_size"] == 2
    p = Plan.from_json(plan)
    assert p.hardware.gpus_per_node == 2
    assert p.chosen.micro_batch_size * p.chosen.grad_accum_steps * 2 == cfg["train"]["global_batch"]
    cmd = (d / "command.txt").read_text()
    assert "torch.distributed.run" in cmd and "shardtrain.runtime.worker" in cmd and str(d) in cmd
    assert (d / "logs").is_dir() and (d / "checkpoints").is_dir()
    assert not (d / "ds_config.json").exists() and not (d / "fsdp.json").exists()  # DDP: no engine config


def test_raw_dict_and_engine_configs_follow_the_strategy(tmp_path):
    d = prepare_run_dir(RAW, {"train.strategy": "zero2"}, tmp_path / "r")
    ds = json.loads((d / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 8
    assert "deepspeed.launcher.runner" in (d / "command.txt").read_text()
    assert not (d / "fsdp.json").exists()
    # no training state yet: a different strategy may overwrite, and the stale DeepSpeed config goes
    prepare_run_dir(RAW, {"train.strategy": "fsdp_full_shard"}, d)
    assert (d / "fsdp.json").is_file() and not (d / "ds_config.json").exists()


def test_re_preparing_with_the_same_config_keeps_checkpoints_and_metrics(tmp_path):
    d = prepare_run_dir(RAW, {}, tmp_path / "r")
    before = {n: (d / n).read_text() for n in ("run.yaml", "plan.json")}
    _fake_state(d)
    prepare_run_dir(RAW, {}, d)
    assert (d / "checkpoints" / "step_5" / "state.pt").read_bytes() == b"x" * 16
    assert (d / "metrics.jsonl").read_text().startswith('{"kind": "train"')
    assert {n: (d / n).read_text() for n in before} == before
    # resume-safe keys may change (e.g. train longer)
    prepare_run_dir(RAW, {"train.steps": 40, "run.eval_every": 5}, d)
    assert yaml.safe_load((d / "run.yaml").read_text())["train"]["steps"] == 40
    assert (d / "checkpoints" / "step_5").is_dir()


def test_a_config_change_that_breaks_checkpoints_is_refused(tmp_path):
    d = prepare_run_dir(RAW, {}, tmp_path / "r")
    _fake_state(d)
    with pytest.raises(ConfigError) as e:  # issue 21: only what the checkpoint depends on is refused
        prepare_run_dir(RAW, {"train.optimizer": "lion"}, d)
    assert "train.optimizer" in str(e.value) and "--no-resume" in str(e.value)
    with pytest.raises(ConfigError, match="seq_len"):
        prepare_run_dir(RAW, {"train.seq_len": 256}, d)
    assert (d / "checkpoints" / "step_5").is_dir()  # nothing was touched


def test_no_resume_moves_the_old_state_aside(tmp_path):
    d = prepare_run_dir(RAW, {}, tmp_path / "r")
    _fake_state(d)
    cfg, p = compile_config(RAW, {"train.lr": 1e-3})
    prepared = rundir.write_run_dir(d, cfg, p, resume=False)
    assert prepared.moved_aside is not None and prepared.moved_aside.parent == d / "previous"
    assert (prepared.moved_aside / "checkpoints" / "step_5" / "state.pt").is_file()
    assert (prepared.moved_aside / "metrics.jsonl").is_file()
    assert not (d / "metrics.jsonl").exists() and not any((d / "checkpoints").iterdir())
    # run.resume: never in the config does the same through the stable entry point
    _fake_state(d)
    prepare_run_dir(RAW, {"run.resume": "never"}, d)
    assert len(list((d / "previous").iterdir())) == 2


def test_a_plan_that_does_not_fit_is_not_prepared(tmp_path):
    with pytest.raises(PlanningError):
        prepare_run_dir({"model": {"name": "llama-3.1-70b"}, "hardware": {"gpus_per_node": 1, "gpu": "rtx3090"},
                         "train": {"strategy": "ddp", "seq_len": 4096}}, {}, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_bad_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.stpes"):
        prepare_run_dir(RAW, {"train.stpes": 3}, tmp_path / "r")
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_run_dir(str(tmp_path / "missing.yaml"), {}, tmp_path / "r")


def test_string_overrides_as_slurm_passes_them(tmp_path):
    d = prepare_run_dir(str(TINY), {"train.steps": "7", "hardware.gpus_per_node": "1"}, tmp_path / "r")
    cfg = yaml.safe_load((d / "run.yaml").read_text())
    assert cfg["train"]["steps"] == 7 and cfg["hardware"]["gpus_per_node"] == 1
    assert json.loads((d / "plan.json").read_text())["world_size"] == 1
