"""Issue 22 review: loose ends found while checking the issue's points (pure: the real config loader,
planner and CLI, no process).

- a config written back (to_dict: run.yaml, the OOM re-plan's overrides) reads back equal, so no
  ignored-setting warning about a lora section nobody wrote;
- the OOM re-plan asks only "does it fit?": no "to fit, try" search per failed rung;
- the bundle README spells ordinals (every 2nd layer, not 2th).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shardtrain.cli import main
from shardtrain.config import ignored, pipeline
from shardtrain.config.schema import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(ignored, "_PRINTED", set())  # warnings print once per process


FULL = {"model": {"name": "llama-3.1-8b"}, "train": {"method": "full"}}


def test_a_config_written_back_reads_equal_and_warns_nothing(tmp_path, capsys):
    cfg = pipeline.load(FULL)
    again = pipeline.load(cfg, {"train.micro_batch": 2})  # RunConfig + overrides: a to_dict round trip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    from_file = load_run_config(tmp_path / "run.yaml")
    assert again.lora == cfg.lora == from_file.lora
    assert cfg.lora.targets == "all-linear"
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("written,read", [
    ("all-linear", "all-linear"), (["all-linear"], "all-linear"), ("q_proj,v_proj", ("q_proj", "v_proj")),
    (["q_proj", "v_proj"], ("q_proj", "v_proj")),
])
def test_lora_targets_have_one_spelling(written, read):
    cfg = pipeline.load({**FULL, "train": {"method": "lora"}, "lora": {"targets": written}})
    assert cfg.lora.targets == read
    assert pipeline.load(cfg, {"train.seq_len": 1024}).lora.targets == read


def test_a_plain_full_plan_prints_no_warning(capsys):
    rc, out, err = run_cli(["plan", "--model", "llama-3.1-8b", "--method", "full"], capsys)
    assert "warning" not in err, err
    rc, out, err = run_cli(["plan", "--model", "llama-3.1-70b", "--method", "full", "--gpu", "h100-80gb",
                            "--gpus-per-node", "8"], capsys)  # no fit: the advice re-plans the config
    assert "To fit" in out + err and "warning" not in err, err


def test_a_user_written_lora_section_is_still_warned_about(capsys):
    pipeline.load({**FULL, "lora": {"targets": "all-linear", "rank": 8}})
    assert "lora.rank" in capsys.readouterr().err


def test_the_oom_replan_asks_for_no_advice(monkeypatch):
    """Every rung of the OOM ladder here fails to fit (70B full on 8 GPUs, pinned settings): each failed
    re-plan must not run the advice search (up to MAX_REPLANS re-plans each)."""
    from shardtrain.compiler import advice
    from shardtrain.launcher import oom
    cfg = pipeline.load({"model": {"name": "llama-3.1-8b"}, "hardware": {"gpu": "a100-40gb", "gpus_per_node": 1},
                         "train": {"method": "lora", "strategy": "ddp", "micro_batch": 1, "grad_ckpt": "full",
                                   "loss": "chunked", "activation_offload": "cpu"}})
    plan = pipeline.plan_for(cfg)
    big = pipeline.load({"model": {"name": "llama-3.1-70b"}, "hardware": {"gpu": "h100-80gb", "gpus_per_node": 8},
                         "train": {"method": "full"}})
    calls = []
    monkeypatch.setattr(advice, "advise", lambda *a, **k: calls.append(1) or ((), 0))
    # the plan of the small job, the config of the big one: every rung's re-plan of `big` fails
    assert oom.next_plan(big, plan, [{"rank": 0, "phase": "backward", "step": 2}]) is None
    assert oom.switch_strategy(big, plan, {}, "rank 0") is None
    assert calls == []
    with pytest.raises(Exception):
        pipeline.compile(big)  # the control: a plain compile of a no-fit config does advise
    assert calls == [1]


def test_bundle_readme_spells_ordinals():
    from dataclasses import replace

    from shardtrain.emit import readme
    cfg, plan = pipeline.compile({"model": {"name": "llama-3.1-8b"}, "hardware": {"gpu": "a100-40gb"},
                                  "train": {"method": "lora", "grad_ckpt": "selective", "selective_every": 2}})
    assert plan.chosen.gradient_checkpointing.value == "selective", plan.chosen.gradient_checkpointing
    for k, want in [(2, "every 2nd decoder layer"), (3, "every 3rd decoder layer"), (11, "every 11th decoder layer")]:
        p = replace(plan, train=replace(plan.train, selective_every=k))
        assert want in readme._checkpointing(p)
