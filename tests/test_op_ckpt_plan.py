"""grad_ckpt op (compiler/op_ckpt.py): torchtitan's op-level SAC policy in the plan — which matmuls it
saves (hand-computed for Llama-3.1-8B, with and without LoRA), the bytes a layer keeps, the recomputed
FLOPs, the phase model's activations, the planner's auto search (op between selective and full), the
flag, and the runners that cannot run it."""
from __future__ import annotations

import pytest

from shardtrain.cli import main
from shardtrain.compiler.inventory import tensor_inventory
from shardtrain.compiler.op_ckpt import (layer_mms, lora_adapted, recompute_flops_per_token, recompute_fraction,
                                         saved_bytes_per_token)
from shardtrain.compiler.planner import PlanningError, evaluate_phases, plan
from shardtrain.compiler.specs import (ActivationOffload, GradCkpt, HardwareSpec, LossMode, Method, Optimizer,
                                       ParallelDims, ParallelRequest, Precision, Runner, Strategy, TrainSpec)
from shardtrain.config.presets import load_model_spec

M8 = load_model_spec("llama-3.1-8b")   # h 4096, 32 heads, 8 kv heads (kvd 1024), I 14336, 32 layers


def test_saved_mms_are_the_odd_ones_in_hf_order():
    mms = layer_mms(M8)
    assert [m.name for m in mms] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert [m.name for m in mms if m.saved] == ["q_proj", "v_proj", "gate_proj", "down_proj"]


def test_lora_mms_shift_the_parity():
    """peft's Linear runs base, lora_A, lora_B: with q/v adapted the counter sees 11 mms per layer."""
    lora = lora_adapted(tensor_inventory(M8, Method.LORA, 16, ("q_proj", "v_proj")))
    assert lora == {"q_proj": 16, "v_proj": 16}
    mms = layer_mms(M8, lora)
    assert [m.name for m in mms] == ["q_proj", "q_proj.lora_A", "q_proj.lora_B", "k_proj", "v_proj", "v_proj.lora_A",
                                     "v_proj.lora_B", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert [m.name for m in mms if m.saved] == ["q_proj", "q_proj.lora_B", "v_proj", "v_proj.lora_B", "gate_proj",
                                                "down_proj"]
    # bf16: 2 × (4096 + 4096 + 1024 + 1024 + 14336 + 4096) saved mm outputs + SDPA out 2 × 4096 + fp32 lse 4 × 32
    assert saved_bytes_per_token(M8, Precision.BF16, lora=lora) == 2 * 28672 + 8192 + 128


def test_saved_bytes_and_recompute_hand_computed():
    # q 4096, v 1024, gate 14336, down 4096 in bf16, + SDPA output (2 × 32 × 128) + logsumexp (4 × 32)
    assert saved_bytes_per_token(M8, Precision.BF16) == 2 * (4096 + 1024 + 14336 + 4096) + 2 * 4096 + 4 * 32 == 55424
    assert saved_bytes_per_token(M8, Precision.FP32) == 4 * (4096 + 1024 + 14336 + 4096) + 4 * 4096 + 4 * 32
    # tp 2: the colwise outputs halve (q, v, gate), rowwise down_proj keeps h, heads halve
    tp2 = ParallelDims(tp=2)
    assert saved_bytes_per_token(M8, Precision.BF16, parallel=tp2) == 2 * (2048 + 512 + 7168 + 4096) + 2 * 2048 + 4 * 16
    # recomputed: k (4096×1024), o (4096×4096), up (4096×14336), 2 FLOPs per MAC, 32 layers
    assert recompute_flops_per_token(M8) == 32 * 2 * (4096 * 1024 + 4096 * 4096 + 4096 * 14336)
    fwd = 2 * M8.active_params + 12 * 32 * 4096 * 32 * 128 * 0.5 / 3   # cost.step_time's forward at seq 4096
    assert recompute_fraction(M8, GradCkpt.OP, 2, 4096) == pytest.approx(recompute_flops_per_token(M8) / fwd)
    assert 0.2 < recompute_fraction(M8, GradCkpt.OP, 2, 4096) < 0.5     # less than selective every 2nd (0.5)
    assert recompute_fraction(M8, GradCkpt.FULL, 2, 4096) == 1.0


def test_phase_model_keeps_input_plus_saved_ops():
    """The forward peak differs from full checkpointing by exactly (L - 1) × tokens × saved bytes: under the
    chunked loss only one chunk of logits exists at the lm_head (phases.py head_tokens), so the forward's
    peak instant is the last unit's all-gather, where the last layer has not run yet and L - 1 layers hold
    their saved ops' outputs (both plans peak there)."""
    hw, t = HardwareSpec(gpus_per_node=1), TrainSpec(seq_len=2048, micro_batch_size=1, global_batch_size=1)
    groups = tensor_inventory(M8, Method.FULL)
    act = {}
    for ck in (GradCkpt.FULL, GradCkpt.OP, GradCkpt.NONE):
        _, ph, _ = evaluate_phases(M8, hw, t, groups, Strategy.FSDP_FULL_SHARD, method=Method.FULL,
                                   optimizer=Optimizer.ADAMW, micro=1, ckpt=ck, defer=False, loss=LossMode.CHUNKED,
                                   act_offload=ActivationOffload.NONE)
        act[ck] = ph["forward"].activations
    assert act[GradCkpt.OP] - act[GradCkpt.FULL] == (32 - 1) * 2048 * 55424
    assert act[GradCkpt.FULL] < act[GradCkpt.OP] < act[GradCkpt.NONE]


def _plan(gib: int, ckpt: GradCkpt = GradCkpt.AUTO, **kw):
    t = TrainSpec(seq_len=8192, micro_batch_size=1, global_batch_size=8, grad_ckpt=ckpt, loss=LossMode.CHUNKED,
                  strategy=Strategy.FSDP_FULL_SHARD, parallel=ParallelRequest(tp=1, cp=1), **kw)
    return plan(M8, HardwareSpec(gpus_per_node=8, gpu_memory_bytes=gib * 2**30), t)


def test_auto_picks_op_between_selective_and_full():
    forced = {ck: _plan(80, ck).chosen for ck in (GradCkpt.SELECTIVE, GradCkpt.OP, GradCkpt.FULL)}
    mem = {ck: c.per_gpu.total for ck, c in forced.items()}
    step = {ck: c.step_time_s for ck, c in forced.items()}
    assert mem[GradCkpt.FULL] < mem[GradCkpt.OP] < mem[GradCkpt.SELECTIVE]
    assert step[GradCkpt.OP] < step[GradCkpt.SELECTIVE] < step[GradCkpt.FULL]
    # a GPU between op's and selective's need: auto takes op (faster than full) and says why
    gib = int((mem[GradCkpt.OP] + mem[GradCkpt.SELECTIVE]) / 2 / 2**30) + 2
    p = _plan(gib)
    assert p.chosen.gradient_checkpointing is GradCkpt.OP, [c.gradient_checkpointing for c in p.alternatives]
    assert any(r.startswith("gradient checkpointing op") for r in p.reasons)


def test_hf_runners_cannot_run_op():
    with pytest.raises(PlanningError, match="grad_ckpt: op cannot run under runner accelerate"):
        _plan(80, GradCkpt.OP, runner=Runner.ACCELERATE)
    # auto under an HF runner never picks op
    p = _plan(40, runner=Runner.HF_TRAINER)
    assert all(c.gradient_checkpointing is not GradCkpt.OP for c in (p.chosen, *p.alternatives))


def test_flag(capsys):
    rc = main(["plan", "--model", "llama-3.1-8b", "--gpus-per-node", "8", "--seq-len", "8192", "--grad-ckpt", "op",
               "--global-batch", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "gradient checkpointing op" in out
    rc = main(["plan", "--model", "llama-3.1-8b", "--grad-ckpt", "opp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "op" in err[0]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_op_saved_bytes_match_the_traced_runtime(method):
    """The runtime's op SAC (runtime/sac.py, via runtime.modeling.enable_checkpointing) traced under
    FSDP2 (FSDPMemTracker, 2 fake ranks): what op keeps beyond full checkpointing in the forward is exactly
    the plan's L × tokens × saved bytes (LoRA all-linear: the adapter mms shift the parity), and the peak
    is within -2% / +8% (measured: -0.3% full, -0.4% LoRA)."""
    pytest.importorskip("torch")
    from pathlib import Path
    from shardtrain.trace import trace_plan
    small = load_model_spec(str(Path(__file__).resolve().parent / "fixtures" / "models" / "small-llama-32k.json"))
    act, err = {}, {}
    for ck in (GradCkpt.FULL, GradCkpt.OP):
        t = TrainSpec(seq_len=1024, micro_batch_size=1, global_batch_size=2, strategy=Strategy.FSDP_FULL_SHARD,
                      grad_ckpt=ck, loss=LossMode.FULL, method=Method(method))
        p = plan(small, HardwareSpec(gpus_per_node=2), t)
        res = trace_plan(p)
        untraced = sum(res.per_phase[res.peak_phase].get(k, 0) for k in res.untraced)
        traced = res.total - untraced
        err[ck] = (p.chosen.per_gpu.total - untraced - traced) / traced
        fwd = dict(p.chosen.per_phase)["forward"]
        act[ck] = (res.per_phase["forward"].get("Activation", 0), fwd.activations + fwd.logits)
    assert act[GradCkpt.OP][0] - act[GradCkpt.FULL][0] == act[GradCkpt.OP][1] - act[GradCkpt.FULL][1] > 0
    assert -0.02 <= err[GradCkpt.OP] <= 0.08, err


def test_emitted_hf_configs_checkpoint_every_layer_for_op(tmp_path, capsys):
    """accelerate / the Trainer have no op SAC: an op plan's bundle checkpoints whole layers there (less
    memory than op), never nothing; plan.json keeps op for shardtrain's runtime; `check` passes the files."""
    import json
    for strategy, method, out in (("fsdp_full_shard", "full", tmp_path / "fsdp"), ("ddp", "lora", tmp_path / "ddp")):
        rc = main(["emit", "--model", "llama-3.1-8b", "--gpus-per-node", "8", "--seq-len", "4096", "--global-batch",
                   "8", "--grad-ckpt", "op", "--strategy", strategy, "--method", method, "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        assert json.loads((out / "plan.json").read_text())["gradient_checkpointing"] == "op"
        args = json.loads((out / "trainer_args.json").read_text())
        if strategy == "ddp":
            assert args["activation_checkpointing"] is True
        else:
            assert json.loads((out / "fsdp.json").read_text())["activation_checkpointing"] == "full"
            assert args["fsdp_config"]["activation_checkpointing"] is True
            assert "fsdp_activation_checkpointing: true" in (out / "accelerate.yaml").read_text()
        assert "op-level selective checkpointing runs only under shardtrain launch" in (out / "README.md").read_text()
        for f in ("trainer_args.json", "accelerate.yaml"):
            assert main(["check", str(out / f)]) == 0, capsys.readouterr()
