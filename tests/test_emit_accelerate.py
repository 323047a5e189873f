"""accelerate YAML emitted from plans goes through accelerate's own loader with values intact, then
through `accelerate launch`'s own validation and environment preparation, and the plugins accelerate
builds from that environment carry our settings (FSDP2, wrap class, DeepSpeed JSON)."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from emit_plans import make_plan
from shardtrain.emit.accelerate import AccelerateConfigError, accelerate_config, notes, render_yaml
from shardtrain.emit.deepspeed import deepspeed_config

pytest.importorskip("accelerate")

PLANS = {  # name: make_plan kwargs
    "ddp-1": dict(strategy="ddp"), "ddp-8": dict(strategy="ddp", gpus_per_node=8),
    "zero1-8": dict(strategy="zero1", gpus_per_node=8), "zero2-8": dict(strategy="zero2", gpus_per_node=8),
    "zero3-8": dict(strategy="zero3", gpus_per_node=8),
    "zero3_offload-8": dict(strategy="zero3_offload", gpus_per_node=8),
    "zero_infinity-8": dict(strategy="zero_infinity", gpus_per_node=8),
    "zero3-2x4": dict(strategy="zero3", nodes=2, gpus_per_node=4),
    "fsdp_full-8": dict(strategy="fsdp_full_shard", gpus_per_node=8, grad_ckpt="full"),
    "fsdp_grad_op-8": dict(strategy="fsdp_shard_grad_op", gpus_per_node=8, precision="fp32"),
    "fsdp_hybrid-2x4": dict(strategy="fsdp_hybrid_shard", nodes=2, gpus_per_node=4, method="qlora"),
}


def _write(tmp_path, name):
    plan = make_plan(**PLANS[name])
    ds = tmp_path / "ds_config.json"
    if plan.strategy.engine.value == "deepspeed":
        ds.write_text(json.dumps(deepspeed_config(plan)))
    d = accelerate_config(plan, ds_config_path=str(ds), main_process_ip="10.0.0.1" if plan.hardware.nodes > 1 else None)
    f = tmp_path / "accelerate.yaml"
    f.write_text(render_yaml(d, notes(plan)))
    return plan, d, f


@pytest.mark.parametrize("name", PLANS)
def test_loader_keeps_values(name, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    plan, d, f = _write(tmp_path, name)
    loaded = load_config_from_file(str(f)).to_dict()
    for k, v in d.items():
        assert loaded[k] == v, (k, loaded[k], v)
    assert yaml.safe_load(f.read_text()) == d


@pytest.mark.parametrize("name", PLANS)
def test_launch_validation_and_plugins(name, tmp_path, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    plan, d, f = _write(tmp_path, name)
    args = launch_command_parser().parse_args(["--config_file", str(f), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    for k in os.environ:
        if k.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_")):
            monkeypatch.delenv(k)
    if d["distributed_type"] == "DEEPSPEED":
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        cmd, env = prepare_deepspeed_cmd_env(args)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        from accelerate.utils import DeepSpeedPlugin
        plugin = DeepSpeedPlugin()  # raises if accelerate refuses a key next to deepspeed_config_file
        ds = json.loads((tmp_path / "ds_config.json").read_text())
        assert plugin.zero_stage == ds["zero_optimization"]["stage"] == plan.strategy.zero_stage
        assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == plan.chosen.micro_batch_size
        assert plugin.gradient_accumulation_steps == plan.chosen.grad_accum_steps
        assert plugin.zero3_init_flag == (plan.strategy.zero_stage == 3)
        return
    if d["distributed_type"] == "NO":
        assert not args.multi_gpu and not args.use_fsdp
        return
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == d["mixed_precision"]
    assert (args.nnodes, args.nproc_per_node) == (str(plan.hardware.nodes), str(plan.hardware.gpus_per_node)) \
        if plan.hardware.nodes > 1 else args.nproc_per_node == str(plan.chosen.world_size)
    if d["distributed_type"] != "FSDP":
        return
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from accelerate.utils import FullyShardedDataParallelPlugin
    p = FullyShardedDataParallelPlugin()
    fc = d["fsdp_config"]
    assert p.fsdp_version == 2 and p.reshard_after_forward is fc["fsdp_reshard_after_forward"]
    assert p.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert p.cpu_ram_efficient_loading and p.activation_checkpointing == fc["fsdp_activation_checkpointing"]
    assert p.state_dict_type.name == "SHARDED_STATE_DICT"
    if "parallelism_config" in d:
        from accelerate.parallelism_config import ParallelismConfig
        pc = ParallelismConfig()
        assert (pc.dp_replicate_size, pc.dp_shard_size) == (plan.hardware.nodes, plan.hardware.gpus_per_node)


def test_multi_node_needs_an_address():
    with pytest.raises(AccelerateConfigError, match="--master-addr"):
        accelerate_config(make_plan("zero3", nodes=2, gpus_per_node=4))


def test_deepspeed_yaml_leaves_duplicates_to_the_json():
    d = accelerate_config(make_plan("zero2", gpus_per_node=8))
    assert "mixed_precision" not in d and set(d["deepspeed_config"]) == {"deepspeed_config_file", "zero3_init_flag"}


def test_accelerate_itself_refuses_mixed_precision_next_to_a_ds_file(tmp_path, monkeypatch):
    """Why the DeepSpeed YAML has no mixed_precision (and why `shardtrain check` flags it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    plan, d, f = _write(tmp_path, "zero2-8")
    f.write_text(yaml.safe_dump({**d, "mixed_precision": "bf16"}))
    args, defaults, mp_from_config = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(f), "train.py"]))
    args.deepspeed_fields_from_accelerate_config = ",".join(
        list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
    for k, v in prepare_deepspeed_cmd_env(args)[1].items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="will be ignored"):
        DeepSpeedPlugin()
