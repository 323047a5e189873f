"""Run-config schema: strict keys, types and values, each error naming key, value and fix."""
from __future__ import annotations

import pytest

from shardtrain.compiler.specs import (DataFormat, Device, GradCkpt, Launcher, Method, ModelInit, Precision, Resume,
                                       Strategy)
from shardtrain.config.resolve import resolve_specs
from shardtrain.config.schema import ConfigError, load_run_config, parse_run_config

BASE = {"model": {"name": "tiny-llama"}}


def cfg(**sections):
    raw = {**BASE}
    for k, v in sections.items():
        raw[k] = v
    return parse_run_config(raw)


def test_defaults_and_types():
    c = cfg(train={"micro_batch": "auto", "precision": "BF16", "grad_ckpt": "full", "lr": "1e-4"},
            hardware={"gpu_memory": "24GB", "cpu_memory": "64GiB"})
    assert c.train.micro_batch is None and c.train.precision is Precision.BF16
    assert c.train.grad_ckpt is GradCkpt.FULL and c.train.lr == 1e-4
    assert c.hardware.gpu_memory == 24 * 10**9 and c.hardware.cpu_memory == 64 * 2**30


@pytest.mark.parametrize("raw,needles", [
    ({"trian": {}}, ["unknown section 'trian'", "train"]),
    ({"train": {"seq_lne": 3}}, ["train.seq_lne", "seq_len"]),
    ({"train": {"precision": "bf61"}}, ["train.precision", "'bf61'", "bf16"]),
    ({"train": {"seq_len": "long"}}, ["train.seq_len", "'long'", "integer"]),
    ({"train": {"seq_len": 0}}, ["train.seq_len", "0", ">= 1"]),
    ({"train": {"strategy": "zero4"}}, ["train.strategy", "zero4", "zero3"]),
    ({"train": {"micro_batch": 0}}, ["train.micro_batch", "auto"]),
    ({"train": {"headroom": 1.5}}, ["train.headroom", "1.5", "fraction"]),
    ({"hardware": {"gpu_memory": "lots"}}, ["hardware.gpu_memory", "'lots'", "80GiB"]),
    ({"hardware": {"nodes": True}}, ["hardware.nodes", "True"]),
    ({"lora": {"targets": []}}, ["lora.targets", "non-empty"]),
    ({"train": {"method": "qlora", "precision": "fp32"}}, ["qlora", "bf16"]),
    ({"train": "fast"}, ["train", "mapping"]),
    ({"run": {"device": "gpu"}}, ["run.device", "'gpu'", "cuda"]),
    ({"run": {"launcher": "mpi"}}, ["run.launcher", "'mpi'", "torchrun"]),
    ({"run": {"resume": "yes"}}, ["run.resume", "'yes'", "never"]),
    ({"data": {"format": "csv"}}, ["data.format", "'csv'", "jsonl"]),
    ({"model": {"init": "zeros"}}, ["model.init", "'zeros'", "pretrained"]),
])
def test_bad_values_name_key_value_fix(raw, needles):
    with pytest.raises(ConfigError) as ei:
        parse_run_config({**BASE, **raw})
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))


def test_choices_are_enums():
    c = cfg(run={"device": "CPU", "launcher": "deepspeed", "resume": "never"}, data={"format": "text"},
            train={"strategy": "zero3"}, model={"name": "tiny-llama", "init": "random"})
    assert (c.run.device, c.run.launcher, c.run.resume) == (Device.CPU, Launcher.DEEPSPEED, Resume.NEVER)
    assert c.data.format is DataFormat.TEXT and c.model.init is ModelInit.RANDOM and c.train.strategy is Strategy.ZERO3
    assert cfg().train.strategy == "auto" and cfg().to_dict()["train"]["strategy"] == "auto"  # run.yaml keeps "auto"


def test_model_name_xor_params():
    with pytest.raises(ConfigError, match="model.name .* or model.params"):
        parse_run_config({"train": {}})
    with pytest.raises(ConfigError, match="either model.name or model.params"):
        parse_run_config({"model": {"name": "tiny-llama", "params": 7e9}})


def test_overrides_beat_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: {name: tiny-llama}\ntrain: {seq_len: 128, method: lora}\n")
    c = load_run_config(p, {"train.seq_len": "256", "hardware.gpus_per_node": 2})
    assert c.train.seq_len == 256 and c.train.method is Method.LORA and c.hardware.gpus_per_node == 2
    with pytest.raises(ConfigError, match="section.key=value"):
        load_run_config(p, {"seq_len": 3})


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_run_config(p)


def test_every_example_config_is_valid():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs" / "examples"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/examples/*.yaml missing"
    for f in files:
        resolve_specs(load_run_config(f))


def test_resolve_specs_units():
    c = cfg(hardware={"gpu": "a100-40gb", "gpus_per_node": 4, "nvme_path": "/nvme"},
            train={"strategy": "zero3", "seq_len": 2048}, lora={"rank": 8, "targets": "q_proj,v_proj"})
    m, hw, t = resolve_specs(c)
    assert hw.gpu_memory_bytes > 39 * 2**30 and hw.world_size == 4 and hw.nvme_capacity_bytes > 0
    assert t.strategy.value == "zero3" and t.lora.targets == ("q_proj", "v_proj") and t.lora.rank == 8
    with pytest.raises(ConfigError, match="hardware.gpu"):
        resolve_specs(cfg(hardware={"gpu": "h1000"}))
