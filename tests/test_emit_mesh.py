"""Issue 18 (6): every emitted file with a mesh passes its tool's own parser, and a broken copy of each is
rejected by `shardtrain check` with one line naming the key.

Judges: DeepSpeed 0.19's DeepSpeedConfig (its batch assertion with the world size the job runs on, its
TPTrainingConfig for tensor_parallel), accelerate 1.15's launch path (config loader, _validate_launch_command,
prepare_multi_gpu_env -> PARALLELISM_CONFIG_* -> ParallelismConfig() as a worker builds it), and
TrainingArguments(parallelism_config=ParallelismConfig(...)). Plans get their mesh by dataclasses.replace
(tests/emit_plans.py with_mesh) until the planner searches meshes."""
from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import pytest
import yaml

from emit_plans import make_plan, with_mesh
from shardtrain.cli import main
from shardtrain.compiler.specs import ParallelDims
from shardtrain.emit import deepspeed as K
from shardtrain.emit.accelerate import AccelerateMeshError, accelerate_config, render_yaml
from shardtrain.emit.bundle import Site, bundle
from shardtrain.emit.check import check_accelerate, check_deepspeed
from shardtrain.emit.fsdp import fsdp_settings
from shardtrain.emit.trainer import parallelism_config, trainer_deepspeed_config

GOLDEN = Path(__file__).parent / "golden" / "emit"
MESH_GOLDENS = sorted(d.name for d in GOLDEN.iterdir() if d.name.startswith("mesh-"))
M8 = dict(model="llama-3.1-8b", seq_len=4096, micro_batch=1)
LLAMA8B_HEADS = "llama-3.1-8b"  # 32 heads, 8 kv heads


def _world(case: str) -> int:
    return yaml.safe_load((GOLDEN / case / "accelerate.yaml").read_text())["num_processes"]


def deepspeed_parses(cfg: dict, world: int):
    """DeepSpeed's own DeepSpeedConfig on `world` processes without an mpu (how accelerate and our worker call
    deepspeed.initialize): raises if it refuses the config, its batch assertion included."""
    import deepspeed.runtime.config as dsc
    old = dsc.dist
    dsc.dist = types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: world)
    try:
        return dsc.DeepSpeedConfig(json.loads(json.dumps(cfg)))
    finally:
        dsc.dist = old


def test_there_are_mesh_goldens_for_each_kind():
    assert {"mesh-fsdp-tp2xdp_shard4-8xh100", "mesh-fsdp-hsdp2x4-2x4xh100", "mesh-fsdp-ulysses_cp2xdp_shard4-8xh100",
            "mesh-zero2-sp2xdp_shard4-8xh100", "mesh-zero1-autotp2xdp_shard4-8xh100"} <= set(MESH_GOLDENS)


@pytest.mark.parametrize("case", [c for c in MESH_GOLDENS if "zero" in c])
def test_deepspeed_parser_accepts_mesh_goldens(case):
    world = _world(case)
    ds = json.loads((GOLDEN / case / "ds_config.json").read_text())
    conf = deepspeed_parses(ds, world)  # the batch assertion runs with the job's world size
    sp, tp = ds.get(K.SEQUENCE_PARALLEL_SIZE, 1), ds.get(K.TENSOR_PARALLEL, {}).get(K.AUTOTP_SIZE, 0)
    assert conf.train_batch_size == ds[K.TRAIN_BATCH_SIZE]
    assert conf.world_size == world / sp  # DeepSpeed's own division by sequence_parallel_size
    assert conf.tensor_parallel_config.autotp_size == tp
    # samples per step = micro × accumulation × dp: dp = world / (sp × tp)
    dp = world // (sp * max(tp, 1))
    assert conf.train_micro_batch_size_per_gpu * conf.gradient_accumulation_steps * dp == 32
    # the Trainer-facing copy too, once the Trainer/accelerate "auto" values are placeholders
    hf = json.loads((GOLDEN / case / "hf_ds_config.json").read_text())
    hf = {**hf, K.GRADIENT_CLIPPING: 1.0, K.OPTIMIZER: {**hf[K.OPTIMIZER], K.PARAMS: {
        k: (1e-5 if v == "auto" else v) for k, v in hf[K.OPTIMIZER][K.PARAMS].items()}}}
    assert deepspeed_parses(hf, world).train_batch_size == conf.train_batch_size  # derived by DeepSpeed under sp


@pytest.mark.parametrize("case", [c for c in MESH_GOLDENS if "zero" in c])
def test_trainer_accepts_the_mesh_deepspeed_json_on_the_jobs_world(case, capsys, tmp_path):
    """transformers' HfTrainerDeepSpeedConfig (check_hf runs it with world size 8) finds no mismatch: under
    Ulysses hf_ds_config.json has no train_batch_size (the Trainer would want world × micro × accumulation,
    DeepSpeed world / sp × micro × accumulation); under AutoTP both count every rank."""
    hf = json.loads((GOLDEN / case / "hf_ds_config.json").read_text())
    assert (K.TRAIN_BATCH_SIZE in hf) == (K.SEQUENCE_PARALLEL_SIZE not in hf)
    out = _check(GOLDEN / case / "trainer_args.json", "--gpus-per-node", "8", capsys=capsys)
    assert not _errors(out), out
    if K.SEQUENCE_PARALLEL_SIZE in hf:  # the DeepSpeed-correct number is what the Trainer refuses
        d = _copy(tmp_path, case)
        _edit(d / "hf_ds_config.json", lambda c: c.update({K.TRAIN_BATCH_SIZE: 32}))
        errs = _errors(_check(d / "trainer_args.json", "--gpus-per-node", "8", capsys=capsys))
        assert "train_batch_size=32 vs hf train_batch_size (calculated)=64" in errs["deepspeed"], errs


def test_deepspeed_parser_refuses_the_world_based_batch_under_ulysses():
    """The value a 1-D emitter wrote (micro × accum × world) is what DeepSpeed refuses once sp divides the world."""
    ds = json.loads((GOLDEN / "mesh-zero2-sp2xdp_shard4-8xh100" / "ds_config.json").read_text())
    wrong = {**ds, K.TRAIN_BATCH_SIZE: ds[K.MICRO_BATCH] * ds[K.GRAD_ACCUM] * 8}
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        deepspeed_parses(wrong, 8)
    errs = [f for f in check_deepspeed(wrong, world_size=8) if f.severity == "error"]
    assert [f.key for f in errs] == [K.TRAIN_BATCH_SIZE] and "sequence_parallel_size 2" in errs[0].problem


@pytest.mark.parametrize("case", [c for c in MESH_GOLDENS if "fsdp" in c])
def test_accelerate_launch_builds_the_planned_mesh(case, tmp_path, monkeypatch):
    """accelerate's own launch path turns the YAML block into PARALLELISM_CONFIG_* and a worker's
    ParallelismConfig() reads back the plan's sizes, multiplying to num_processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils.launch import prepare_multi_gpu_env
    f = tmp_path / "accelerate.yaml"
    shutil.copy(GOLDEN / case / "accelerate.yaml", f)
    d = yaml.safe_load(f.read_text())
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(f), "train.py"]))
    assert args.use_parallelism_config
    for k in list(os.environ):
        if k.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_")):
            monkeypatch.delenv(k)
    for k, v in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(k, v)
    pc = ParallelismConfig()
    block = d["parallelism_config"]
    assert (pc.dp_replicate_size, pc.dp_shard_size, pc.tp_size, pc.cp_size) == tuple(
        block[f"parallelism_config_{k}_size"] for k in ("dp_replicate", "dp_shard", "tp", "cp"))
    assert pc.total_size == d["num_processes"]
    if pc.cp_size > 1:
        from accelerate.utils import TorchContextParallelConfig
        assert TorchContextParallelConfig().cp_comm_strategy == block["parallelism_config_cp_comm_strategy"]


@pytest.mark.parametrize("mesh", [dict(dp_shard=4, tp=2), dict(dp_replicate=2, dp_shard=4), dict(dp_shard=4, cp=2)])
def test_training_arguments_take_the_parallelism_config(mesh, tmp_path):
    from accelerate.parallelism_config import ParallelismConfig
    from transformers import TrainingArguments
    plan = make_plan("fsdp_full_shard", gpus_per_node=8, global_batch=32, mesh=mesh, **M8)
    pc = ParallelismConfig(**parallelism_config(plan))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, parallelism_config=pc)
    assert args.parallelism_config.total_size == plan.parallel.world == 8


def test_deepspeed_ulysses_parallelism_config_is_accelerates_sp():
    from accelerate.parallelism_config import ParallelismConfig
    plan = make_plan("zero2", gpus_per_node=8, global_batch=32, mesh=dict(dp_shard=4, cp=2), **M8)
    pc = ParallelismConfig(**parallelism_config(plan))
    assert pc.sp_size == 2 and pc.sp_backend == "deepspeed" and pc.build_device_mesh("cpu") is None


def test_fsdp_settings_follow_the_mesh():
    tp = fsdp_settings(make_plan("fsdp_full_shard", gpus_per_node=8, global_batch=32, mesh=dict(dp_shard=4, tp=2), **M8))
    assert (tp.mesh_shape, tp.mesh_dim_names, tp.sharding, tp.world_size) == ((4,), ("dp_shard",), "FULL_SHARD", 4)
    cp = fsdp_settings(make_plan("fsdp_full_shard", gpus_per_node=8, global_batch=32,
                                 mesh=dict(dp_replicate=2, dp_shard=2, cp=2), **M8))
    assert (cp.mesh_shape, cp.mesh_dim_names, cp.sharding) == ((2, 4), ("dp_replicate", "dp_shard"), "HYBRID_SHARD")
    # HSDP on fsdp_shard_grad_op: the mesh decides HYBRID, the strategy the resharding
    go = fsdp_settings(make_plan("fsdp_shard_grad_op", gpus_per_node=8, global_batch=32,
                                 mesh=dict(dp_replicate=2, dp_shard=4), **M8))
    assert go.sharding == "HYBRID_SHARD" and go.reshard_after_forward is False
    # fsdp_hybrid_shard on one node is plain FULL_SHARD (its 1-D mesh), not a hybrid
    one = fsdp_settings(make_plan("fsdp_hybrid_shard", gpus_per_node=8, **M8))
    assert (one.sharding, one.mesh_shape) == ("FULL_SHARD", (8,))


def test_emit_refuses_meshes_deepspeed_cannot_run():
    zero3 = make_plan("zero3", gpus_per_node=8, global_batch=32, mesh=dict(dp_shard=4, tp=2), **M8)
    with pytest.raises(K.DeepSpeedConfigError, match="parallel.tp: 2: DeepSpeed AutoTP trains with ZeRO-1/2 only"):
        K.deepspeed_config(zero3)
    ring = make_plan("zero2", gpus_per_node=8, global_batch=32, mesh=dict(dp_shard=4, cp=2, cp_mode="ring"), **M8)
    with pytest.raises(K.DeepSpeedConfigError, match="parallel.cp_mode: 'ring'"):
        K.deepspeed_config(ring)
    both = make_plan("zero2", gpus_per_node=8, global_batch=32, mesh=dict(dp_shard=2, cp=2, tp=2), **M8)
    with pytest.raises(K.DeepSpeedConfigError, match="cannot combine AutoTP with Ulysses"):
        K.deepspeed_config(both)


def test_accelerate_refused_mesh_is_left_out_of_the_bundle_with_the_reason():
    plan = make_plan("fsdp_full_shard", gpus_per_node=4, global_batch=8, mesh=dict(dp_replicate=2, tp=2), **M8)
    with pytest.raises(AccelerateMeshError, match="parallel: dp_replicate 2 × tp 2: accelerate refuses"):
        accelerate_config(plan)
    files = bundle(plan, Site(run_dir="/runs/x"))
    assert "accelerate.yaml" not in files and "fsdp.json" in files
    assert "no accelerate.yaml and no ParallelismConfig for the Trainer (parallel: dp_replicate 2 × tp 2" in files["README.md"]
    assert "parallelism_config=ParallelismConfig" not in files["README.md"]
    # accelerate itself agrees
    from accelerate.parallelism_config import ParallelismConfig
    with pytest.raises(ValueError, match="pure data parallelism"):
        ParallelismConfig(dp_replicate_size=2, tp_size=2)


def test_verify_names_a_mesh_mismatch():
    plan = make_plan("zero2", gpus_per_node=8, global_batch=32, mesh=dict(dp_shard=4, cp=2), **M8)
    ds = K.deepspeed_config(plan)
    assert K.verify(ds, plan) == []
    one_d = with_mesh(make_plan("zero2", gpus_per_node=8, global_batch=32, **M8), ParallelDims(dp_shard=8))
    problems = K.verify(ds, one_d)
    assert any(p.startswith("ds_config.json: sequence_parallel_size=2 but the plan's mesh is dp_shard 8") for p in problems)
    # same 32 samples per step, but the 1-D plan spreads them over 8 dp ranks: accumulation 4, not 8
    assert "ds_config.json: gradient_accumulation_steps=8 but the plan has 4; re-emit the config from plan.json" \
        in problems


def test_nvme_buffer_divides_by_the_shard_group():
    base = make_plan("zero_infinity", gpus_per_node=8, global_batch=32, grad_ckpt="full", **M8)
    one_d = K.nvme_buffer_elements(base)
    sp = K.nvme_buffer_elements(with_mesh(base, ParallelDims(dp_shard=4, cp=2)))
    assert sp == one_d  # dp 4 × sp 2 partition like 8 data-parallel ranks (DeepSpeed's seq_data_parallel group)
    assert K.nvme_buffer_elements(with_mesh(base, ParallelDims(dp_replicate=8))) == one_d


# ------------------------------------------------------------------ broken copies: check rejects each
def _check(path: Path, *flags: str, capsys) -> list[dict]:
    capsys.readouterr()
    main(["check", str(path), "--json", *flags])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _errors(out) -> dict[str, str]:
    return {o["key"]: o["message"] for o in out if o["severity"] == "error"}


def _copy(tmp_path, case: str) -> Path:
    d = tmp_path / case
    shutil.copytree(GOLDEN / case, d)
    return d


def _edit(path: Path, edit) -> None:
    if path.suffix == ".json":
        d = json.loads(path.read_text())
        edit(d)
        path.write_text(json.dumps(d))
    else:
        d = yaml.safe_load(path.read_text())
        edit(d)
        path.write_text(yaml.safe_dump(d))


def test_check_passes_mesh_goldens_with_the_model(capsys):
    for case in MESH_GOLDENS:
        for name in ("ds_config.json", "accelerate.yaml"):
            if (GOLDEN / case / name).exists():
                hw = ["--gpus-per-node", "8"] if name.endswith(".json") else []  # the YAML has its own
                out = _check(GOLDEN / case / name, "--model", LLAMA8B_HEADS, "--seq-len", "4096", *hw, capsys=capsys)
                assert not _errors(out), (case, name, out)


def test_broken_deepspeed_mesh_copies_fail(tmp_path, capsys):
    d = _copy(tmp_path, "mesh-zero2-sp2xdp_shard4-8xh100")
    ds = d / "ds_config.json"
    _edit(ds, lambda c: c.update({K.SEQUENCE_PARALLEL_SIZE: 3}))
    errs = _errors(_check(ds, "--gpus-per-node", "8", capsys=capsys))
    assert "does not multiply out: world size 8 is not a multiple of sequence_parallel_size 3" in \
        errs[K.SEQUENCE_PARALLEL_SIZE]
    # Ulysses sp must divide the heads: sp 6 on 12 ranks, llama-3.1-8b has 32 heads
    _edit(ds, lambda c: c.update({K.SEQUENCE_PARALLEL_SIZE: 6, K.TRAIN_BATCH_SIZE: 16}))
    errs = _errors(_check(ds, "--gpus-per-node", "12", "--model", LLAMA8B_HEADS, capsys=capsys))
    assert "6 does not divide the model's 32 attention heads" in errs[K.SEQUENCE_PARALLEL_SIZE], errs

    d = _copy(tmp_path, "mesh-zero1-autotp2xdp_shard4-8xh100")
    ds = d / "ds_config.json"
    _edit(ds, lambda c: c[K.ZERO].update({K.STAGE: 3}))
    errs = _errors(_check(ds, "--gpus-per-node", "8", capsys=capsys))
    assert "AutoTP trains with ZeRO-1/2 only" in errs[f"{K.TENSOR_PARALLEL}.{K.AUTOTP_SIZE}"], errs
    _edit(ds, lambda c: (c[K.ZERO].update({K.STAGE: 1}), c[K.TENSOR_PARALLEL].update({K.AUTOTP_SIZE: 16}),
                         c.update({K.TRAIN_BATCH_SIZE: 128})))
    errs = _errors(_check(ds, "--gpus-per-node", "16", "--model", LLAMA8B_HEADS, capsys=capsys))
    assert "16 does not divide the model's 8 key/value heads" in errs[f"{K.TENSOR_PARALLEL}.{K.AUTOTP_SIZE}"], errs
    _edit(ds, lambda c: (c[K.TENSOR_PARALLEL].update({K.AUTOTP_SIZE: 2}), c.update({K.TRAIN_BATCH_SIZE: 32})))
    errs = _errors(_check(ds, "--gpus-per-node", "8", capsys=capsys))
    assert "32 != micro 1 × accumulation 8 × 8 ranks = 64" in errs[K.TRAIN_BATCH_SIZE], errs


def test_broken_accelerate_mesh_copies_fail(tmp_path, capsys):
    d = _copy(tmp_path, "mesh-fsdp-tp2xdp_shard4-8xh100")
    y = d / "accelerate.yaml"
    _edit(y, lambda c: c["parallelism_config"].update({"parallelism_config_dp_shard_size": 2}))
    errs = _errors(_check(y, capsys=capsys))
    assert "the mesh does not multiply out: dp_replicate 1 × dp_shard 2 × tp 2 × cp 1 × sp 1 = 4, but " \
           "num_processes is 8" in errs["parallelism_config"], errs
    _edit(y, lambda c: c["parallelism_config"].update({"parallelism_config_dp_shard_size": 1,
                                                       "parallelism_config_dp_replicate_size": 4}))
    errs = _errors(_check(y, capsys=capsys))
    assert "ParallelismConfig refuses it" in errs["parallelism_config"] and "pure data parallelism" in \
        errs["parallelism_config"], errs
    _edit(y, lambda c: (c["parallelism_config"].update({"parallelism_config_dp_replicate_size": 1,
                                                        "parallelism_config_tp_size": 16}), c.update(num_processes=16)))
    errs = _errors(_check(y, "--model", LLAMA8B_HEADS, capsys=capsys))
    assert "16 does not divide the model's 8 key/value heads" in errs["parallelism_config.parallelism_config_tp_size"]
    # and the same copy with a legal tp passes (the rejections above are the edits, not the file)
    _edit(y, lambda c: (c["parallelism_config"].update({"parallelism_config_tp_size": 2, "parallelism_config_dp_shard_size": 4}),
                        c.update(num_processes=8)))
    assert not _errors(_check(y, "--model", LLAMA8B_HEADS, capsys=capsys))


def test_parallelism_block_on_deepspeed_yaml_is_a_warning():
    d = yaml.safe_load((GOLDEN / "mesh-zero2-sp2xdp_shard4-8xh100" / "accelerate.yaml").read_text())
    assert "parallelism_config" not in d  # emit leaves it out: accelerate's DeepSpeed launch path ignores it
    d["parallelism_config"] = {"parallelism_config_sp_size": 2}
    found = [f for f in check_accelerate({k: v for k, v in d.items() if k != "deepspeed_config"} | {
        "deepspeed_config": {"zero_stage": 2}}) if f.key == "parallelism_config"]
    assert [f.severity for f in found] == ["warning"] and "silently ignored" in found[0].problem


def test_trainer_deepspeed_json_keeps_the_mesh_keys():
    plan = make_plan("zero1", gpus_per_node=8, global_batch=32, mesh=dict(dp_shard=4, tp=2), **M8)
    hf = trainer_deepspeed_config(plan)
    assert hf[K.TENSOR_PARALLEL] == {K.AUTOTP_SIZE: 2} and hf[K.TRAIN_BATCH_SIZE] == 1 * 8 * 8
    assert render_yaml(accelerate_config(plan, ds_config_path="x.json"), []).count("parallelism_config") == 0


@pytest.mark.parametrize("case,mesh", [("mesh-zero2-sp2xdp_shard4-8xh100", "dp_shard 4 × cp 2 (ulysses)"),
                                       ("mesh-zero1-autotp2xdp_shard4-8xh100", "dp_shard 4 × tp 2"),
                                       ("mesh-fsdp-hsdp2x4-2x4xh100", "dp_replicate 2 × dp_shard 4"),
                                       ("mesh-fsdp-tp2xdp_shard4-8xh100", "dp_shard 4 × tp 2")])
def test_fit_verdict_plans_the_files_mesh(case, mesh, capsys):
    """`check FILE --model M` re-plans the job the file describes, mesh included (and the global batch: DeepSpeed's
    train_batch_size counts each AutoTP rank, so the samples per step are train_batch_size / tp)."""
    name = "ds_config.json" if "zero" in case else "accelerate.yaml"
    flags = ["--gpus-per-node", "8"] if "zero" in case else []
    capsys.readouterr()
    assert main(["check", str(GOLDEN / case / name), "--model", "llama-3.1-8b", "--seq-len", "4096", *flags]) == 0
    out = capsys.readouterr().out
    assert f", mesh {mesh}, micro batch " in out and "fits" in out, out  # (the YAML does not say the micro batch)


def test_plan_json_with_a_mesh_that_does_not_multiply_out_fails(tmp_path, capsys):
    plan = make_plan("fsdp_full_shard", gpus_per_node=8, global_batch=32, mesh=dict(dp_shard=4, tp=2), **M8)
    files = bundle(plan, Site(run_dir=str(tmp_path)))
    good = tmp_path / "plan.json"
    good.write_text(files["plan.json"])
    assert not _errors(_check(good, capsys=capsys))
    _edit(good, lambda d: d["parallel"].update({"tp": 4}))
    errs = _errors(_check(good, capsys=capsys))
    assert "the mesh dp_shard 4 × tp 4 multiplies to 16 ranks, but the plan's world size is 8" in \
        errs["parallel"], errs


@pytest.mark.parametrize("case", MESH_GOLDENS)
def test_a_broken_copy_of_every_mesh_golden_fails(case, tmp_path, capsys):
    """Each mesh golden's mesh file with one size changed so it no longer multiplies out to the world size."""
    d = _copy(tmp_path, case)
    if (d / "ds_config.json").exists():
        ds = d / "ds_config.json"
        key = K.SEQUENCE_PARALLEL_SIZE if K.SEQUENCE_PARALLEL_SIZE in json.loads(ds.read_text()) else K.AUTOTP_SIZE
        _edit(ds, lambda c: c.update({key: 3}) if key in c else c[K.TENSOR_PARALLEL].update({key: 3}))
        errs = _errors(_check(ds, "--gpus-per-node", "8", capsys=capsys))
        where = key if key in errs else f"{K.TENSOR_PARALLEL}.{key}"
        assert "the mesh does not multiply out: world size 8" in errs[where], errs
    else:
        y = d / "accelerate.yaml"
        _edit(y, lambda c: c.update(num_processes=2 * c["num_processes"]))
        errs = _errors(_check(y, capsys=capsys))
        assert "the mesh does not multiply out" in errs["parallelism_config"], errs
