"""Issue 19 point 2: pure bf16 training (`train.precision: bf16_pure`; torchtune's `dtype: bf16`, Answer.AI's
`--precision bf16`): model, gradients and optimizer states in bf16, no fp32 master, no autocast. Plan only
(no torch): model-state bytes by hand, the phases' gradient terms, legality (DeepSpeed refused in one line),
the planner on a published-size job, the config key and flag, and what emit writes. The runs on real engines
(measured state bytes and peaks, losses going down) are tests/runtime/test_pure_bf16_run.py."""
from __future__ import annotations

import pytest

from shardtrain.compiler.inventory import tensor_inventory, trainable_params
from shardtrain.compiler.memory import fsdp_shard_groups, model_state_bytes
from shardtrain.compiler.optimizer_states import state_bytes
from shardtrain.compiler.planner import PlanningError, illegal_reason, plan
from shardtrain.compiler.specs import HardwareSpec, Method, Optimizer, Precision, Strategy, TrainSpec
from shardtrain.config.presets import load_model_spec

GiB = 2**30
PURE, MIXED = Precision.BF16_PURE, Precision.BF16
L8B = load_model_spec("llama-3.1-8b")
TINY = load_model_spec("tiny-llama")


def hw(gpus=1, mem=80 * GiB, **kw):
    return HardwareSpec(gpus_per_node=gpus, gpu_memory_bytes=mem, **kw)


def _ms(strategy, precision, method=Method.FULL, optimizer=Optimizer.ADAMW, model=TINY, gpus=2, **kw):
    groups = tensor_inventory(model, method)
    return groups, model_state_bytes(model, groups, strategy, hw(gpus), method=method, precision=precision,
                                     optimizer=optimizer, **kw)


def test_enum_properties():
    assert Precision("bf16_pure") is PURE
    assert (PURE.param_bytes, PURE.trainable_bytes, PURE.autocast, PURE.is_bf16) == (2, 2, False, True)
    assert (MIXED.param_bytes, MIXED.trainable_bytes, MIXED.autocast, MIXED.is_bf16) == (2, 4, True, True)
    assert (Precision.FP32.trainable_bytes, Precision.FP32.autocast) == (4, False)


def test_ddp_full_adamw_is_8_bytes_per_param():
    """2 (bf16 param) + 2 (bf16 grad) + 4 (AdamW exp_avg + exp_avg_sq like the param) = 8 B/param, against
    mixed precision's 4 + 4 + 8 = 16 (ZeRO paper K=12 + 4: the same 16, split differently)."""
    groups, ms = _ms(Strategy.DDP, PURE)
    T = trainable_params(groups)
    assert (ms.params, ms.grads, ms.master_params, ms.optimizer_states, ms.buffers) == (2 * T, 2 * T, 0, 4 * T, 0)
    _, mixed = _ms(Strategy.DDP, MIXED)
    assert (mixed.params, mixed.grads, mixed.optimizer_states) == (4 * T, 4 * T, 8 * T)


def test_fsdp_full_shard_by_hand():
    """Sharded params/grads/states in bf16 (dim 0 padded to N); the unit's buffers: all-gather of the current
    + prefetched unit (2 B) and its unsharded grads + the reduce-scatter input, both bf16 (no fp32 reduce)."""
    N = 2
    groups, ms = _ms(Strategy.FSDP_FULL_SHARD, PURE, gpus=N)
    Ts = trainable_params(fsdp_shard_groups(groups, N))
    unit = max(TINY.per_layer_params, TINY.embedding_params, TINY.lm_head_params)
    assert (ms.params, ms.grads, ms.master_params, ms.optimizer_states) == (2 * Ts, 2 * Ts, 0, 4 * Ts)
    assert ms.buffers == 2 * unit * 2 + unit * (2 + 2)
    _, mixed = _ms(Strategy.FSDP_FULL_SHARD, MIXED, gpus=N)
    assert mixed.buffers == 2 * unit * 2 + unit * (2 + 4)
    _, deferred = _ms(Strategy.FSDP_FULL_SHARD, PURE, gpus=N, fsdp_defer_grad_sync=True)
    assert deferred.grads == 2 * Ts + 2 * trainable_params(groups)


def test_lora_adapters_in_bf16():
    """LoRA: the frozen base is bf16 either way; pure bf16 also keeps the adapters (and their states) in bf16."""
    groups, ms = _ms(Strategy.DDP, PURE, method=Method.LORA)
    _, mixed = _ms(Strategy.DDP, MIXED, method=Method.LORA)
    T = trainable_params(groups)
    frozen = 2 * sum(g.total for g in groups if not g.trainable)
    assert (ms.params, ms.grads, ms.optimizer_states) == (frozen + 2 * T, 2 * T, 4 * T)
    assert (mixed.params, mixed.grads, mixed.optimizer_states) == (frozen + 4 * T, 4 * T, 8 * T)


def test_optimizer_state_dtypes():
    """torch AdamW / SGD and our Lion / Adafactor allocate states like the param: halved; bitsandbytes'
    8-bit states are uint8 + fp32 absmax whatever the param dtype: unchanged."""
    groups = tensor_inventory(TINY, Method.FULL)
    for opt in (Optimizer.ADAMW, Optimizer.LION, Optimizer.SGD, Optimizer.ADAFACTOR):
        assert state_bytes(opt, groups, elem_bytes=2) * 2 == state_bytes(opt, groups), opt
    assert state_bytes(Optimizer.ADAMW8BIT, groups, elem_bytes=2) == state_bytes(Optimizer.ADAMW8BIT, groups)


def test_deepspeed_refused_in_one_line():
    h = hw(2)
    for s in (Strategy.ZERO1, Strategy.ZERO2, Strategy.ZERO3, Strategy.ZERO3_OPT_OFFLOAD):
        why = illegal_reason(s, Optimizer.ADAMW, Method.FULL, PURE, h)
        assert why and "\n" not in why and "bf16_pure" in why and "precision: bf16" in why, (s, why)
    for s in (Strategy.DDP, Strategy.FSDP_FULL_SHARD, Strategy.FSDP_OFFLOAD):
        assert illegal_reason(s, Optimizer.ADAMW, Method.QLORA, PURE, h) is None
    assert "no bf16" in illegal_reason(Strategy.DDP, Optimizer.ADAMW, Method.FULL, PURE, hw(gpu_name="v100",
                                                                                            supports_bf16=False))
    t = TrainSpec(seq_len=512, global_batch_size=8, precision=PURE, strategy=Strategy.ZERO2)
    with pytest.raises(PlanningError, match="bf16_pure"):
        plan(TINY, hw(2), t)


def test_8b_full_finetune_on_one_80gb_gpu():
    """torchtune's single-device full fine-tune of Llama-3.1-8B: impossible in mixed precision (16 B/param =
    120 GiB of model state), it fits in pure bf16 (8 B/param = 60 GiB) — with DDP (one rank), no DeepSpeed."""
    t = TrainSpec(seq_len=2048, global_batch_size=8, precision=PURE)
    p = plan(L8B, hw(1), t)
    c = p.chosen
    assert c.fits and c.precision is PURE and c.strategy.engine.value != "deepspeed"
    assert c.per_gpu.master_params == 0 and c.per_gpu.optimizer_states == 4 * L8B.num_params
    from shardtrain.compiler.planner import NoFitError
    with pytest.raises(NoFitError, match="nothing fits"):
        plan(L8B, hw(1), TrainSpec(seq_len=2048, global_batch_size=8, strategy=Strategy.DDP))


def test_phases_grads_in_bf16():
    """FSDP2 phases: the sharded gradients at the optimizer step are bf16 (2·T_shard), not fp32."""
    t = TrainSpec(seq_len=512, global_batch_size=2, micro_batch_size=1, precision=PURE,
                  strategy=Strategy.FSDP_FULL_SHARD)
    c = plan(TINY, hw(2), t).chosen
    groups = tensor_inventory(TINY, Method.FULL)
    Ts = trainable_params(fsdp_shard_groups(groups, 2))
    assert dict(c.per_phase)["optimizer"].grads == 2 * Ts


def test_config_key_and_flag():
    import argparse
    from shardtrain.config.flags import add_plan_flags, overrides_from_args
    from shardtrain.config.pipeline import compile as compile_config
    from shardtrain.config.schema import TrainConfig
    ap = argparse.ArgumentParser()
    add_plan_flags(ap)
    over = overrides_from_args(ap.parse_args(["--precision", "bf16_pure"]))
    assert over == {"train.precision": "bf16_pure"}
    cfg, p = compile_config({"model": {"name": "tiny-llama"}, "hardware": {"gpus_per_node": 2},
                             "train": {"seq_len": 128, "global_batch": 4}}, over)
    assert cfg.train.precision is PURE and p.chosen.precision is PURE
    # the docstring says what it costs
    import inspect
    src = inspect.getsource(TrainConfig)
    assert "bf16_pure" in src and "no fp32 master" in src.replace("\n", " ")


def test_emitted_settings():
    from emit_plans import make_plan
    from shardtrain.emit.accelerate import accelerate_config
    from shardtrain.emit.fsdp import fsdp_settings
    from shardtrain.emit.readme import readme
    from shardtrain.emit.trainer import trainer_arguments
    p = make_plan("fsdp_full_shard", gpus_per_node=2, precision="bf16_pure")
    f = fsdp_settings(p)
    # the params are bf16: param_dtype = reduce_dtype = bf16 is no MixedPrecisionPolicy cast at all
    assert (f.param_dtype, f.reduce_dtype) == ("bfloat16", "bfloat16")
    # accelerate: "no" (any other value upcasts trainable params to fp32 under FSDP2); Trainer: neither flag
    assert accelerate_config(p)["mixed_precision"] == "no"
    kw = trainer_arguments(p)
    assert kw["bf16"] is False and kw["fp16"] is False
    assert "dtype=torch.bfloat16" in readme(p, [])
    mixed = make_plan("fsdp_full_shard", gpus_per_node=2, precision="bf16")
    assert fsdp_settings(mixed).reduce_dtype == "float32" and accelerate_config(mixed)["mixed_precision"] == "bf16"


def test_deepspeed_emitter_refuses_a_hand_edited_pure_plan():
    import dataclasses
    from emit_plans import make_plan
    from shardtrain.emit import deepspeed as K
    p = make_plan("zero2", gpus_per_node=2)
    p = dataclasses.replace(p, chosen=dataclasses.replace(p.chosen, precision=PURE))
    with pytest.raises(ValueError, match="bf16_pure"):
        K.deepspeed_config(p)
