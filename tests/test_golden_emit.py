"""Golden files for a representative matrix of emitted outputs (tests/golden/emit/<case>/<file>):
DeepSpeed JSON (our worker's ds_config.json and the Trainer/accelerate hf_ds_config.json), FSDP settings,
trainer_args.json, lora_config.json / bnb_config.json, accelerate YAML, launch.sh, hostfile, README.md
and the torchrun / deepspeed command lines — everything `shardtrain emit` writes except plan.json
and run.yaml (those follow the planner and the schema, which have their own tests).
tests/test_check_roundtrip.py runs `shardtrain check` on every one of these files.

Regenerate after a deliberate change, then review the diff:
    SHARDTRAIN_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_emit.py
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from emit_plans import make_plan
from shardtrain.emit.bundle import Site, bundle, render

GOLDEN = Path(__file__).parent / "golden" / "emit"
REGEN = os.environ.get("SHARDTRAIN_REGEN_GOLDEN") == "1"
M8 = dict(model="llama-3.1-8b", seq_len=4096, micro_batch=1)
CASES = {
    "zero1-8xh100-bf16-adamw": dict(strategy="zero1", gpus_per_node=8, global_batch=64, **M8),
    "zero2-8xh100-fp16-sgd": dict(strategy="zero2", gpus_per_node=8, global_batch=64, precision="fp16",
                                  optimizer="sgd", **M8),
    "zero2_offload-8xh100-bf16-lion": dict(strategy="zero2_offload", gpus_per_node=8, global_batch=64,
                                           optimizer="lion", **M8),
    "zero3-2x8xh100-bf16-adamw8bit": dict(strategy="zero3", nodes=2, gpus_per_node=8, global_batch=128,
                                          optimizer="adamw8bit", **M8),
    "zero3_offload-8xh100-bf16-lora": dict(strategy="zero3_offload", gpus_per_node=8, global_batch=64,
                                           method="lora", grad_ckpt="full", **M8),
    "zero_infinity-1xa100-fp32-adamw": dict(strategy="zero_infinity", gpus_per_node=1, global_batch=8,
                                            precision="fp32", grad_ckpt="full", nvme_path="/local_nvme/st", **M8),
    "fsdp_full_shard-8xh100-bf16-adafactor": dict(strategy="fsdp_full_shard", gpus_per_node=8, global_batch=64,
                                                  optimizer="adafactor", grad_ckpt="selective", **M8),
    "fsdp_shard_grad_op-8xh100-fp32": dict(strategy="fsdp_shard_grad_op", gpus_per_node=8, global_batch=64,
                                           precision="fp32", grad_ckpt="none", **M8),
    "fsdp_hybrid_shard-2x8xh100-qlora": dict(strategy="fsdp_hybrid_shard", nodes=2, gpus_per_node=8,
                                             global_batch=128, method="qlora", grad_ckpt="full", **M8),
    # issue 19: FSDP2 + CPUOffloadPolicy (Answer.AI's 70B QLoRA on 2 x 24 GB) and ZeRO-3 with the optimizer
    # offloaded but the parameters on the GPU (the HF Ulysses / ALST benchmarks)
    "fsdp_offload-2xrtx3090-70b-qlora": dict(strategy="fsdp_offload", gpus_per_node=2, gpu="rtx3090",
                                             model="llama-3.1-70b", seq_len=2048, micro_batch=1, global_batch=8,
                                             method="qlora", grad_ckpt="full"),
    "zero3_opt_offload-8xh100-bf16-adamw": dict(strategy="zero3_opt_offload", gpus_per_node=8, global_batch=64,
                                                grad_ckpt="full", **M8),
    "ddp-1xh100-lora": dict(strategy="ddp", gpus_per_node=1, global_batch=8, method="lora", grad_ckpt="full", **M8),
    # issue 18: meshes, forced through the run config's parallel: section (the planner's own candidate)
    "mesh-fsdp-tp2xdp_shard4-8xh100": dict(strategy="fsdp_full_shard", gpus_per_node=8, global_batch=64,
                                           parallel=dict(dp_replicate=1, dp_shard=4, tp=2, cp=1), **M8),
    "mesh-fsdp-hsdp2x4-2x4xh100": dict(strategy="fsdp_full_shard", nodes=2, gpus_per_node=4, global_batch=64,
                                       parallel=dict(dp_replicate=2, dp_shard=4, tp=1, cp=1), **M8),
    "mesh-fsdp-ulysses_cp2xdp_shard4-8xh100": dict(strategy="fsdp_full_shard", gpus_per_node=8, global_batch=32,
                                                   parallel=dict(dp_replicate=1, dp_shard=4, cp=2, tp=1, cp_mode="ulysses"), **M8),
    "mesh-zero2-sp2xdp_shard4-8xh100": dict(strategy="zero2", gpus_per_node=8, global_batch=32,
                                            parallel=dict(dp_replicate=1, dp_shard=4, cp=2, tp=1, cp_mode="ulysses"), **M8),
    "mesh-zero1-autotp2xdp_shard4-8xh100": dict(strategy="zero1", gpus_per_node=8, global_batch=32,
                                                parallel=dict(dp_replicate=1, dp_shard=4, tp=2, cp=1), **M8),
}


def outputs(name: str) -> dict[str, str]:
    plan = make_plan(**CASES[name])
    nodes = plan.hardware.nodes
    site = Site(run_dir=f"/runs/{name}", hosts=tuple(f"node{i}" for i in range(nodes)) if nodes > 1 else ())
    files = {k: v for k, v in bundle(plan, site).items() if k not in ("plan.json", "run.yaml")}
    if plan.strategy.engine.value == "deepspeed":  # `--format trainer` prints the bundle's hf_ds_config.json
        assert render("trainer", plan, site) == files["hf_ds_config.json"]
    files["torchrun.txt"] = render("torchrun", plan, site)
    files["deepspeed-cmd.txt"] = render("deepspeed-cmd", plan, site)
    return files


@pytest.mark.parametrize("name", CASES)
def test_golden(name):
    files = outputs(name)
    d = GOLDEN / name
    if REGEN:
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
        for k, v in files.items():
            (d / k).write_text(v)
    assert d.is_dir(), f"no goldens for {name}: run with SHARDTRAIN_REGEN_GOLDEN=1"
    assert sorted(p.name for p in d.iterdir()) == sorted(files), "the set of emitted files changed"
    for k, v in files.items():
        assert (d / k).read_text() == v, f"{name}/{k} differs from the golden file (regenerate if intended)"


def test_no_orphan_goldens():
    assert sorted(p.name for p in GOLDEN.iterdir()) == sorted(CASES)
