"""`shardtrain check` catches each pitfall (bad files in tests/fixtures/check/), each finding naming
the key, the problem and the fix; it passes every file `shardtrain emit` writes; and where DeepSpeed
itself stays silent (unknown top-level keys, offload_param at stage 2) the check is what catches it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from emit_plans import DS_STRATEGIES, FSDP_STRATEGIES, make_plan
from shardtrain.cli import main
from shardtrain.emit.check import ERROR, WARNING, check_accelerate, check_deepspeed, load_any

FIX = Path(__file__).parent / "fixtures" / "check"


def run_check(name: str, **kw):
    kind, data = load_any(FIX / name)
    if kind == "deepspeed":
        return check_deepspeed(data, **kw)
    return check_accelerate(data, base_dir=FIX, **kw)


def errors(findings, key_part: str):
    hits = [f for f in findings if f.severity == ERROR and key_part in f.key]
    assert hits, [str(f) for f in findings]
    assert all(f.problem and f.fix for f in hits)
    return hits


def warnings(findings, key_part: str):
    hits = [f for f in findings if f.severity == WARNING and key_part in f.key]
    assert hits, [str(f) for f in findings]
    return hits


def test_unknown_top_level_keys():
    """DeepSpeed ignores unknown top-level keys: a warning, with a rename only for a near miss."""
    f = run_check("unknown_top_level.json")
    assert not [x for x in f if x.severity == ERROR], [str(x) for x in f]
    assert "zero_optimization" in warnings(f, "zero_optimisation")[0].fix
    assert "gradient_clipping" in warnings(f, "gradient_clip")[0].fix
    far = check_deepspeed({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "comms_config": {}})
    assert [x.key for x in far] == ["comms_config"] and "rename" not in far[0].fix


def test_misspelled_blocks():
    f = run_check("misspelled_block.json")
    assert "offload_optimizer" in errors(f, "zero_optimization.offload_optimiser")[0].fix
    assert "overlap_comm" in errors(f, "zero_optimization.overlap_com")[0].fix
    assert "'enabled'" in errors(f, "bf16.enable")[0].fix


def test_offload_param_below_stage3():
    assert "stage" in errors(run_check("offload_param_stage2.json"), "offload_param")[0].fix


def test_nvme_without_path():
    errors(run_check("nvme_no_path.json"), "offload_optimizer.nvme_path")


def test_batch_arithmetic():
    hit = errors(run_check("batch_mismatch.json", world_size=4), "train_batch_size")[0]
    assert "32" in hit.fix or "8" in hit.fix
    assert not [x for x in run_check("batch_mismatch.json", world_size=8) if x.severity == ERROR]
    errors(run_check("batch_impossible.json"), "train_batch_size")


def test_auto_outside_the_trainer():
    """deepspeed.initialize: "auto" batch sizes break its batch arithmetic, optimizer "auto"s reach the
    optimizer as strings (errors); in a pydantic block DeepSpeed drops "auto" for its default (warning)."""
    f = run_check("auto_template.json")
    assert {"train_batch_size", "optimizer.params.lr"} <= {x.key for x in f if x.severity == ERROR}
    assert {"zero_optimization.stage3_prefetch_bucket_size", "bf16.enabled"} <= {
        x.key for x in f if x.severity == WARNING}
    # for the Trainer only what it fills may be auto: stage3_max_live_parameters is not (DeepSpeed's default)
    t = run_check("auto_template.json", consumer="trainer")
    assert not [x for x in t if x.severity == ERROR], [str(x) for x in t]
    assert [x.key for x in t] == ["zero_optimization.stage3_max_live_parameters"]


def test_8bit_optimizer_with_offload():
    assert "AdamW" in errors(run_check("adamw8bit_offload.json", optimizer="adamw8bit"), "offload_optimizer")[0].fix
    data = json.loads((FIX / "adamw8bit_offload.json").read_text())
    data["optimizer"] = {"type": "AdamW8bit", "params": {"lr": 1e-4}}
    errors(check_deepspeed(data), "offload_optimizer")


def test_qlora_zero3_quant_storage():
    assert "bfloat16" in errors(run_check("qlora_zero3.json", method="qlora"), "bnb_4bit_quant_storage")[0].fix
    assert not run_check("qlora_zero3.json", method="qlora", quant_storage="torch.bfloat16")
    errors(run_check("qlora_zero3.json", method="qlora", quant_storage="float16"), "bnb_4bit_quant_storage")


def test_qlora_fsdp_quant_storage():
    errors(run_check("accelerate_fsdp_qlora.yaml", method="qlora"), "bnb_4bit_quant_storage")
    assert not run_check("accelerate_fsdp_qlora.yaml", method="qlora", quant_storage="bfloat16")


def test_accelerate_conflicts_next_to_a_ds_file():
    f = run_check("accelerate_ds_conflicts.yaml", method="qlora")
    for k in ("mixed_precision", "zero_stage", "gradient_accumulation_steps"):
        errors(f, k)
    errors(f, "qlora_zero3.json: bnb_4bit_quant_storage")  # the referenced JSON is linted too


def test_accelerate_fsdp_mistakes():
    f = run_check("accelerate_fsdp_bad.yaml", wrap_class="LlamaDecoderLayer")
    errors(f, "fsdp_reshard_after_forward")
    assert "LlamaDecoderLayer" in errors(f, "fsdp_transformer_layer_cls_to_wrap")[0].fix
    errors(f, "fsdp_sync_module_states")
    # accelerate copies unknown fsdp_config keys onto its argparse namespace and never reads them
    assert "fsdp_state_dict_type" in warnings(f, "fsdp_config.fsdp_state_dict")[0].fix


def test_accelerate_unknown_key_and_process_count():
    f = run_check("accelerate_unknown_key.yaml")
    assert "num_processes" in errors(f, "num_process")[0].fix
    errors(f, "num_processes")


def test_deepspeed_itself_is_silent_where_check_is_not():
    """Evidence for the rule: DeepSpeed's parser accepts these files without a word."""
    from test_emit_deepspeed import parse
    for name in ("unknown_top_level.json", "offload_param_stage2.json"):
        c = parse(json.loads((FIX / name).read_text()), 1)
        assert c.train_batch_size == 16
    with pytest.raises(Exception):  # nested typos do fail, but only at start-up on the cluster
        parse(json.loads((FIX / "misspelled_block.json").read_text()), 1)


PLANS = [dict(strategy=s.value, gpus_per_node=8) for s in DS_STRATEGIES + FSDP_STRATEGIES[:2]] + [
    dict(strategy="fsdp_hybrid_shard", nodes=2, gpus_per_node=4), dict(strategy="ddp", gpus_per_node=8),
    dict(strategy="zero2", optimizer="adamw8bit", gpus_per_node=8), dict(strategy="zero3", optimizer="adafactor"),
    dict(strategy="zero3", method="qlora", gpus_per_node=8), dict(strategy="zero2", precision="fp16")]


@pytest.mark.parametrize("kw", PLANS, ids=[f"{k['strategy']}-{i}" for i, k in enumerate(PLANS)])
def test_check_passes_everything_emit_writes(kw, tmp_path, capsys):
    plan = make_plan(**kw)
    from shardtrain.emit.bundle import Site, bundle
    files = bundle(plan, Site(run_dir=str(tmp_path), master_addr="n0" if plan.hardware.nodes > 1 else None))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    world = plan.chosen.world_size
    if "ds_config.json" in files:
        assert check_deepspeed(json.loads(files["ds_config.json"]), world_size=world,
                               optimizer=plan.chosen.optimizer.value, method=plan.chosen.method.value,
                               quant_storage="bfloat16") == []
        from shardtrain.emit.deepspeed import deepspeed_config
        assert check_deepspeed(deepspeed_config(plan, trainer=True), consumer="trainer", world_size=world) == []
    kind, acc = load_any(tmp_path / "accelerate.yaml")
    assert kind == "accelerate"
    assert check_accelerate(acc, base_dir=tmp_path, wrap_class="LlamaDecoderLayer", method=plan.chosen.method.value,
                            optimizer=plan.chosen.optimizer.value, quant_storage="bfloat16") == []
    for name in ("accelerate.yaml", "ds_config.json"):
        if name in files:
            assert main(["check", str(tmp_path / name), "--gpus-per-node", str(plan.hardware.gpus_per_node),
                         "--nodes", str(plan.hardware.nodes)]) == 0
    assert "error" not in capsys.readouterr().out


def test_cli_exit_codes_and_fit(capsys):
    assert main(["check", str(FIX / "offload_param_stage2.json")]) == 1
    out = capsys.readouterr().out
    assert "error: zero_optimization.offload_param:" in out and "Fix:" in out
    assert main(["check", str(FIX / "qlora_zero3.json"), "--model", "llama-3.2-1b", "--gpus-per-node", "1"]) == 0
    assert "fit: zero3, mesh dp_shard 1, micro batch 2" in capsys.readouterr().out
    rc = main(["check", str(FIX / "qlora_zero3.json"), "--model", "llama-3.1-70b", "--gpus-per-node", "1",
               "--gpu-memory", "24GiB"])
    assert rc == 2 and "does NOT fit" in capsys.readouterr().out


def test_accelerate_own_launcher_judges_what_check_does_not_know():
    """A bad value no rule here knows: accelerate's launcher + FSDP plugin refuse it, so check does."""
    cfg = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "mixed_precision": "bf16",
           "num_machines": 1, "num_processes": 2,
           "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_WRAP",
                           "fsdp_reshard_after_forward": True}}
    hit = errors(check_accelerate(cfg), "fsdp_config")[0]
    assert "TRANSFORMER_WRAP" in hit.problem and "accelerate" in hit.problem
    cfg["fsdp_config"]["fsdp_auto_wrap_policy"] = "TRANSFORMER_BASED_WRAP"
    assert not [f for f in check_accelerate(cfg) if f.severity == ERROR]
