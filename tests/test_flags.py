"""The plan flags (config/flags.py): one table, every command takes them, each is only a config key."""
from __future__ import annotations

import pytest

from shardtrain.cli import build_parser
from shardtrain.config import pipeline
from shardtrain.config.flags import PLAN_FLAGS, overrides_from_args

# A non-default value per flag (--model/--params are exclusive: checked in test_sbatch_flags/test_hostile_input).
SAMPLES = {
    "--hidden": "64", "--layers": "2", "--heads": "4", "--kv-heads": "2", "--vocab": "1000", "--intermediate": "128",
    "--nodes": "2", "--gpus-per-node": "4", "--gpu": "a100-40gb", "--gpu-memory": "40GiB", "--cpu-memory": "64GiB",
    "--nvme-path": "/nvme", "--nvme-capacity": "1TB", "--expandable-segments": "false", "--seq-len": "2048",
    "--micro-batch": "2",
    "--global-batch": "16", "--precision": "fp16", "--method": "lora", "--lora-rank": "8", "--optimizer": "lion",
    "--grad-ckpt": "full", "--attention": "eager", "--loss": "chunked", "--runner": "accelerate", "--activation-offload": "cpu",
    "--strategy": "zero3", "--steps": "7", "--tiled-mlp": "4", "--ckpt-offload": "cpu",
    "--dp-replicate": "2", "--dp-shard": "4", "--tp": "2", "--cp": "1", "--cp-mode": "ulysses",
}
COMMANDS = ("plan", "emit", "check", "launch", "sbatch")


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices


def test_every_command_takes_every_plan_flag():
    _, subs = _subparsers()
    flags = {f.flag for f in PLAN_FLAGS}
    for name in COMMANDS:
        have = {o for a in subs[name]._actions for o in a.option_strings}
        assert flags <= have, (name, flags - have)


def test_samples_cover_the_table():
    assert set(SAMPLES) == {f.flag for f in PLAN_FLAGS} - {"--model", "--params"}


@pytest.mark.parametrize("flag", sorted(SAMPLES))
def test_a_flag_says_exactly_what_its_key_says(flag):
    parser, _ = _subparsers()
    key = next(f.key for f in PLAN_FLAGS if f.flag == flag)
    base = ["plan", "--model", "tiny-llama"]
    by_flag = pipeline.load(None, overrides_from_args(parser.parse_args([*base, flag, SAMPLES[flag]])))
    by_key = pipeline.load(None, overrides_from_args(parser.parse_args([*base, "--set", f"{key}={SAMPLES[flag]}"])))
    default = pipeline.load(None, overrides_from_args(parser.parse_args(base)))
    assert by_flag == by_key
    assert by_flag != default  # the flag reached its key
