"""Issue 19 point 2: the two strategies published runs use — FSDP2 with CPUOffloadPolicy (`fsdp_offload`,
Answer.AI's 70B QLoRA on 2 × 24 GB) and ZeRO-3 with only the optimizer offloaded (`zero3_opt_offload`,
the HF Ulysses / ALST benchmarks): model-state bytes against the strategies they are built from, the
phases, the step time, legality, the planner's choice and its `why`, and what emit writes. Plan only
(no torch), ~3 s; the runs on real engines are in tests/runtime (test_equivalence, test_state_bytes_vs_plan,
test_peak_truth, test_portable_resume)."""
from __future__ import annotations

import pytest

from shardtrain.compiler.inventory import tensor_inventory
from shardtrain.compiler.memory import (gathered_bytes_per_param, largest_unit_params, model_state_bytes,
                                        QLORA_QUANT_STATE_BYTES_PER_TENSOR, qlora_stats_bytes)
from shardtrain.compiler.planner import PlanningError, illegal_reason, plan
from shardtrain.compiler.specs import (Engine, HardwareSpec, Method, OffloadDevice, Optimizer, ParallelRequest,
                                       Precision, Strategy, TrainSpec)
from shardtrain.config.presets import load_model_spec

GiB = 2**30
L8B = load_model_spec("llama-3.1-8b")
FO, Z3O = Strategy.FSDP_OFFLOAD, Strategy.ZERO3_OPT_OFFLOAD


def hw(gpus=8, mem=80 * GiB, **kw):
    return HardwareSpec(gpus_per_node=gpus, gpu_memory_bytes=mem, **kw)


def _ms(strategy, method=Method.FULL, precision=Precision.BF16, h=None, **kw):
    groups = tensor_inventory(L8B, method)
    return model_state_bytes(L8B, groups, strategy, h or hw(), method=method, precision=precision,
                             optimizer=Optimizer.ADAMW, **kw)


def test_enum_properties():
    assert FO.engine is Engine.FSDP and FO.zero_stage == 0 and FO.shards_params
    assert FO.offload_optimizer is FO.offload_params is OffloadDevice.CPU and not FO.deepspeed_offload
    assert Z3O.engine is Engine.DEEPSPEED and Z3O.zero_stage == 3 and Z3O.shards_params and Z3O.deepspeed_offload
    assert (Z3O.offload_optimizer, Z3O.offload_params) == (OffloadDevice.CPU, OffloadDevice.NONE)


@pytest.mark.parametrize("method", [Method.FULL, Method.LORA, Method.QLORA])
def test_fsdp_offload_moves_fsdp_full_shard_state_to_the_host(method):
    """What fsdp_full_shard keeps per rank (sharded params, sharded grads, states) is exactly what
    fsdp_offload keeps on the host; the device keeps fsdp_full_shard's gather buffers plus the copied-in
    host shards of the current and prefetched unit (fp32 trainable + 16-bit cast, frozen in its storage)."""
    full, off = _ms(Strategy.FSDP_FULL_SHARD, method), _ms(FO, method)
    groups = tensor_inventory(L8B, method)
    # QLoRA's quantisation statistics are no parameter: whole on every rank's device, not offloaded
    stats = qlora_stats_bytes(groups, method)
    assert (stats > 0) == (method is Method.QLORA)
    assert (off.params, off.grads, off.master_params, off.optimizer_states) == (stats, 0, 0, 0)
    assert off.cpu_bytes + stats == full.params + full.grads + full.optimizer_states
    bpp, tf = gathered_bytes_per_param(groups, method, Precision.BF16)
    unit = largest_unit_params(L8B)
    h2d = int(2 * unit / 8 * (bpp + 2 * tf + 2 * tf))   # stored = gathered + 2 B/trainable; + the bf16 cast
    assert off.buffers == full.buffers + h2d
    assert h2d < 0.4 * full.buffers   # a shard of two units: small next to the gathered units


def test_qlora_statistics_are_whole_on_every_fsdp_rank():
    """bitsandbytes keeps absmax + QuantState on the Linear4bit module (not a parameter): 2 ranks or 8, each
    holds all of it; only the packed NF4 bytes shard (measured on the real engine: test_state_bytes_vs_plan
    qlora_fsdp_offload, host and device terms within 0.5%)."""
    g = tensor_inventory(L8B, Method.QLORA)
    stats = qlora_stats_bytes(g, Method.QLORA)
    quantized = sum(x.total for x in g if x.quantizable and not x.trainable)
    tensors = sum(x.count for x in g if x.quantizable and not x.trainable)
    # 8-bit absmax per 64 + fp32 absmax per 256 blocks, and each tensor's QuantState (codes, offset)
    assert stats == pytest.approx(quantized * (1 / 64 + 4 / (64 * 256)) + tensors * QLORA_QUANT_STATE_BYTES_PER_TENSOR,
                                  abs=tensors)
    for n in (2, 8):
        assert _ms(FO, Method.QLORA, h=hw(gpus=n)).params == stats


def test_qlora_statistics_are_whole_on_every_zero3_rank():
    """ZeRO-3 partitions the packed NF4 parameter (ds_tensor); the QuantState on the module stays whole, as
    under FSDP2 (measured: QLoRA on zero3_opt_offload, 2 gloo ranks, tiny Llama: params 300,424 B measured,
    300,416 predicted; 298,076 when the statistics were partitioned too, -0.8%)."""
    from shardtrain.compiler.memory import zero3_persistent_bytes
    from shardtrain.compiler.zero_buckets import ZeroBuckets
    g = tensor_inventory(L8B, Method.QLORA)
    stats = qlora_stats_bytes(g, Method.QLORA)
    p4, p8 = (_ms(Z3O, Method.QLORA, h=hw(gpus=n)).params for n in (4, 8))
    # params(N) = partitions / N + what every rank holds whole: 2·params(8) - params(4) is the latter
    buckets = ZeroBuckets.for_model(L8B, sum(x.total for x in g if x.trainable), offload=True)
    whole = zero3_persistent_bytes(g, buckets, Method.QLORA, Precision.BF16) + stats
    assert 2 * p8 - p4 == pytest.approx(whole, rel=0.01)


def test_zero3_opt_offload_keeps_zero3_params_on_the_device():
    """ZeRO-3 optimizer offload: the 16-bit partitions (+ persistent params) stay where zero3 has them;
    master + states + the fp32 gradient partition and the CPU-side 16-bit grad buffer go to the host
    (stage3.py: grad_partitions_flat_buffer on `self.device` = cpu), as zero3_offload's optimizer side."""
    from shardtrain.compiler.memory import _zero3_partition
    z3, opt, both = _ms(Strategy.ZERO3), _ms(Z3O), _ms(Strategy.ZERO3_OFFLOAD)
    assert opt.params == z3.params and opt.master_params == opt.optimizer_states == 0
    P = _zero3_partition(tensor_inventory(L8B, Method.FULL), 8, trainable=True)   # ceil(numel / 8) per tensor
    assert opt.cpu_bytes == 4 * P + 8 * P + (2 + 4) * P   # master + Adam m, v + 16-bit and fp32 grad partitions
    # zero3_offload = the same host side + the 16-bit param partitions (persistent params stay on the device)
    assert both.cpu_bytes == opt.cpu_bytes + opt.params - both.params and both.params < opt.params
    assert opt.grads == both.grads < z3.grads   # only the in-flight gradient on the device


def test_fsdp_offload_phases_hold_no_state_on_the_device():
    """Accumulating: the sharded grads accumulate on the host (foreach_reduce `+=` on the CPU grad), so
    no phase holds gradients beyond the in-flight reduce-scatter output, and the step is on the host."""
    t = TrainSpec(seq_len=4096, global_batch_size=64, micro_batch_size=1, strategy=FO,
                  parallel=ParallelRequest(tp=1, cp=1))
    c = plan(L8B, hw(), t).chosen
    assert c.grad_accum_steps == 8 and not c.fsdp_defer_grad_sync
    phases = dict(c.per_phase)
    assert phases["optimizer"].total == phases["optimizer"].cuda_context
    full = dict(plan(L8B, hw(), TrainSpec(seq_len=4096, global_batch_size=64, micro_batch_size=1,
                                          strategy=Strategy.FSDP_FULL_SHARD, parallel=ParallelRequest(tp=1, cp=1),
                                          )).chosen.per_phase)
    for ph in ("forward", "backward"):
        assert phases[ph].params == phases[ph].optimizer_states == 0
        assert phases[ph].grads < 0.01 * full[ph].grads
        assert phases[ph].total < full[ph].total


def test_step_time_orders_them_after_the_faster_strategies():
    t = dict(seq_len=4096, global_batch_size=64, parallel=ParallelRequest(tp=1, cp=1))
    times = {s: plan(L8B, hw(), TrainSpec(strategy=s, **t)).chosen.step_time_s
             for s in (Strategy.FSDP_FULL_SHARD, Strategy.ZERO3, Z3O, FO, Strategy.ZERO3_OFFLOAD)}
    assert times[Strategy.ZERO3] < times[Z3O] < times[Strategy.ZERO3_OFFLOAD]
    assert times[Strategy.FSDP_FULL_SHARD] < times[FO]
    forced = plan(L8B, hw(), TrainSpec(strategy=Z3O, **t))
    assert any(r.startswith("zero3_opt_offload: 16-bit parameter partitions stay on the GPU") for r in forced.reasons)
    # 8B full fine-tuning fits with plain sharding on 8 x 80 GiB: the slow offload plans are not chosen
    auto = plan(L8B, hw(), TrainSpec(**t))
    assert auto.chosen.strategy not in (FO, Z3O)


def test_legality():
    h = hw()
    bf16 = Precision.BF16
    # FSDP2 offload steps torch's optimizer on the host: any torch optimizer, QLoRA too; not bnb 8-bit (DTensor)
    for opt in (Optimizer.ADAMW, Optimizer.LION, Optimizer.ADAFACTOR, Optimizer.SGD):
        assert illegal_reason(FO, opt, Method.FULL, bf16, h) is None
    assert illegal_reason(FO, Optimizer.ADAMW, Method.QLORA, bf16, h) is None
    assert "8-bit" in illegal_reason(FO, Optimizer.ADAMW8BIT, Method.FULL, bf16, h)
    # ZeRO-3 optimizer offload: DeepSpeed's CPU optimizers only; QLoRA allowed (its params stay on the GPU)
    assert illegal_reason(Z3O, Optimizer.ADAMW, Method.QLORA, bf16, h) is None
    assert "ZeRO-Offload" in illegal_reason(Z3O, Optimizer.ADAFACTOR, Method.FULL, bf16, h)
    assert "QLoRA" in illegal_reason(Strategy.ZERO3_OFFLOAD, Optimizer.ADAMW, Method.QLORA, bf16, h)


def test_fsdp_offload_on_a_mesh_is_refused_in_one_line():
    t = TrainSpec(seq_len=4096, global_batch_size=64, strategy=FO, parallel=ParallelRequest(tp=2))
    with pytest.raises(PlanningError, match="fsdp_offload runs on a 1-D mesh here"):
        plan(L8B, hw(), t)


def test_answer_ai_70b_qlora_on_two_24gb_gpus():
    """`shardtrain plan --params 69e9 --gpus-per-node 2 --gpu rtx3090 --method qlora` (issue 19: was
    "nothing fits"): FSDP2 + CPU offload is the plan, and `why` says what the faster ones need."""
    from shardtrain.cli import main
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["plan", "--params", "69e9", "--gpus-per-node", "2", "--gpu", "rtx3090", "--method", "qlora"])
    out = buf.getvalue()
    assert code == 0, out
    assert "plan       fsdp_offload  [FITS]" in out
    assert "fsdp_offload is the fastest plan that fits" in out
    assert "fsdp_offload (FSDP2 CPUOffloadPolicy): sharded params, gradients and the optimizer step in host RAM" in out
    # every faster strategy gets its line: it does not fit (what it needs) or it is slower (by how much)
    for s in ("ddp", "zero3", "fsdp_full_shard", "zero3_opt_offload"):
        assert f"not {s}: needs" in out or f"not {s}: fits but is slower" in out, (s, out)


def test_emitted_settings():
    from emit_plans import make_plan
    from shardtrain.emit import deepspeed as K
    from shardtrain.emit.accelerate import accelerate_config
    from shardtrain.emit.fsdp import fsdp_settings
    from shardtrain.emit.trainer import fsdp_trainer_config
    p = make_plan("fsdp_offload", gpus_per_node=2, method="qlora")
    f = fsdp_settings(p)
    assert f.cpu_offload and f.reshard_after_forward and f.sharding == "FULL_SHARD"
    assert f.quant_storage_dtype == "bfloat16"
    assert accelerate_config(p)["fsdp_config"]["fsdp_offload_params"] is True
    assert fsdp_trainer_config(p)["cpu_offload"] is True
    z = K.deepspeed_config(make_plan("zero3_opt_offload", gpus_per_node=2))[K.ZERO]
    assert z[K.STAGE] == 3 and z[K.OFFLOAD_OPTIMIZER][K.DEVICE] == "cpu" and K.OFFLOAD_PARAM not in z


def test_check_reads_the_strategy_back():
    """`shardtrain check` re-plans what a file does: an accelerate YAML with fsdp_offload_params and a
    DeepSpeed JSON with only offload_optimizer name the new strategies (not fsdp_full_shard / zero3_offload)."""
    from shardtrain.emit.cli import _derived_overrides
    acc = {"distributed_type": "FSDP", "num_processes": 2, "fsdp_config": {"fsdp_offload_params": True}}
    assert _derived_overrides("accelerate", acc)["train.strategy"] == "fsdp_offload"
    acc["fsdp_config"]["fsdp_offload_params"] = False
    assert _derived_overrides("accelerate", acc)["train.strategy"] == "fsdp_full_shard"
    ds = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert _derived_overrides("deepspeed", ds)["train.strategy"] == "zero3_opt_offload"
    ds["zero_optimization"]["offload_param"] = {"device": "cpu"}
    assert _derived_overrides("deepspeed", ds)["train.strategy"] == "zero3_offload"
