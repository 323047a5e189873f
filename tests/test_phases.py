"""The phase-aware peak model (compiler/phases.py): per-phase sums, the peak phase, hand-computed
terms, accumulation, and the JSON / table surface. Pure (no torch)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from shardtrain.compiler.inventory import tensor_inventory
from shardtrain.compiler.memory import CUDA_CONTEXT_BYTES, model_state_bytes
from shardtrain.compiler.phases import PHASES
from shardtrain.compiler.plan import MEMORY_TERMS, Plan
from shardtrain.compiler.planner import NoFitError, plan
from shardtrain.compiler.specs import GradCkpt, HardwareSpec, Method, Optimizer, Precision, Strategy, TrainSpec
from shardtrain.config.presets import load_model_spec
from shardtrain.report import render_plan

GiB = 2**30
L1B = load_model_spec("llama-3.2-1b")
L8B = load_model_spec("llama-3.1-8b")


def _plan(model, strategy, *, gpus=2, seq=1024, mb=1, accum=1, method="full", ckpt="none", precision="bf16",
          mem=10**4 * GiB, optimizer="adamw"):
    t = TrainSpec(seq_len=seq, micro_batch_size=mb, global_batch_size=mb * accum * gpus, strategy=Strategy(strategy),
                  grad_ckpt=GradCkpt(ckpt), method=Method(method), precision=Precision(precision),
                  optimizer=Optimizer(optimizer))
    try:
        return plan(model, HardwareSpec(gpus_per_node=gpus, gpu_memory_bytes=mem), t)
    except NoFitError as e:
        return e.plan


ALL = [s.value for s in Strategy if s is not Strategy.ZERO_INFINITY]


@pytest.mark.parametrize("strategy", ALL)
@pytest.mark.parametrize("method,ckpt", [("full", "none"), ("lora", "full"), ("qlora", "selective")])
def test_every_phase_sums_and_the_peak_is_the_max(strategy, method, ckpt):
    if method == "qlora" and Strategy(strategy).offload_params.value != "none" and \
            Strategy(strategy).engine.value == "deepspeed":   # fsdp_offload runs QLoRA
        pytest.skip("illegal: QLoRA weights cannot be param-offloaded (planner.illegal_reason)")
    c = _plan(L8B, strategy, method=method, ckpt=ckpt, accum=2).chosen
    phases = dict(c.per_phase)
    assert tuple(phases) == PHASES
    for b in phases.values():
        assert b.total == sum(getattr(b, k) for k in MEMORY_TERMS)
        assert b.cuda_context == CUDA_CONTEXT_BYTES
        assert min(getattr(b, k) for k in MEMORY_TERMS) >= 0
    assert c.per_gpu == phases[c.peak_phase]
    assert c.per_gpu.total == max(b.total for b in phases.values())
    # the optimizer step frees the activations and the logits path
    assert phases["optimizer"].activations == phases["optimizer"].logits == 0


def test_ddp_optimizer_phase_hand_computed():
    """DDP full fine-tuning, AdamW: fp32 params + fp32 grads (bucket views, kept) + m, v; the fused step
    adds nothing (in place); no extra DDP bucket (the grads are the buckets: gradient_as_bucket_view=True,
    all-reduced in place)."""
    c = _plan(L1B, "ddp", gpus=1).chosen
    T = L1B.num_params
    o = dict(c.per_phase)["optimizer"]
    assert (o.params, o.grads, o.optimizer_states, o.master_params) == (4 * T, 4 * T, 8 * T, 0)
    assert o.buffers == 0
    assert o.total == 16 * T + CUDA_CONTEXT_BYTES
    # DDP keeps its gradients in every phase (gradient_as_bucket_view + zero_grad(set_to_none=False))
    assert all(b.grads == 4 * T for _, b in c.per_phase)


def test_loss_path_hand_computed():
    """bf16 logits + fp32 upcast + fp32 log_softmax output in the forward (10 B per logit);
    log_softmax output + nll gradient + its gradient in the backward (12 B); fp32: 12 and 12, except that
    with micro batch 1 `logits[:, :-1].flatten(0, 1)` is a view (no flattened copy): 8 in the forward
    (measured with the real MemTracker, tests/runtime/test_peak_truth.py)."""
    c = _plan(L1B, "ddp", gpus=1, seq=512).chosen
    bsv = 512 * L1B.vocab_size
    phases = dict(c.per_phase)
    assert phases["forward"].logits == 10 * bsv
    assert phases["backward"].logits in (0, 12 * bsv)   # 0 when a layer's backward is the worse instant
    c32 = _plan(L1B, "ddp", gpus=1, seq=512, precision="fp32").chosen
    assert dict(c32.per_phase)["forward"].logits == 8 * bsv
    c32 = _plan(L1B, "ddp", gpus=1, seq=512, mb=2, precision="fp32").chosen
    assert dict(c32.per_phase)["forward"].logits == 12 * 2 * bsv


@pytest.mark.parametrize("strategy", ["fsdp_full_shard", "fsdp_hybrid_shard", "fsdp_shard_grad_op"])
def test_fsdp_grads_absent_in_forward_unless_accumulating(strategy):
    one = dict(_plan(L1B, strategy, gpus=4).chosen.per_phase)
    assert one["forward"].grads == 0                     # zero_grad(set_to_none=True) before the step
    T_shard = math.ceil(L1B.num_params / 4)
    assert one["optimizer"].grads == pytest.approx(4 * T_shard, rel=1e-3)
    acc = _plan(L1B, strategy, gpus=4, accum=4).chosen
    fwd = dict(acc.per_phase)["forward"].grads
    if acc.fsdp_defer_grad_sync:                         # unsharded fp32 grads between syncs
        assert fwd == 4 * L1B.num_params
    else:                                                # sharded grads of earlier micro-steps
        assert fwd == pytest.approx(4 * T_shard, rel=1e-3)


def test_model_states_stay_exact():
    """params / master / states are the engine-exact model_state_bytes in every phase."""
    for strategy in ("ddp", "zero2", "zero3", "fsdp_full_shard"):
        p = _plan(L8B, strategy, gpus=8, method="lora")
        c = p.chosen
        groups = tensor_inventory(L8B, c.method, p.train.lora.rank, p.lora_targets)
        ms = model_state_bytes(L8B, groups, c.strategy, p.hardware, method=c.method, precision=c.precision,
                               optimizer=c.optimizer)
        for _, b in c.per_phase:
            assert (b.params, b.master_params, b.optimizer_states) == (ms.params, ms.master_params,
                                                                      ms.optimizer_states)


def test_phase_peak_is_below_the_old_sum_of_maxima_for_fsdp():
    """Issue 8: summing each term's maximum (model states + activations + logits + buffers) over-stated
    the traced FSDP peak by 26-57%; the phase model's peak is well below that sum."""
    from shardtrain.compiler.activations import layer_bytes_per_token, logits_bytes
    p = _plan(L8B, "fsdp_full_shard", gpus=8, seq=2048)
    c = p.chosen
    assert c.gradient_checkpointing is GradCkpt.NONE
    groups = tensor_inventory(L8B, c.method, p.train.lora.rank, p.lora_targets)
    ms = model_state_bytes(L8B, groups, c.strategy, p.hardware, method=c.method, precision=c.precision,
                           optimizer=c.optimizer)
    kw = dict(micro_batch=1, seq_len=2048, precision=c.precision)
    # the old activation term: every layer's saved tensors, one layer's backward working set + its 2·h
    # input gradients, and the head (embedding + final norm outputs, 2·h)
    tokens = 2048
    ph = c.precision.param_bytes * L8B.hidden_size * tokens
    per_layer = layer_bytes_per_token(L8B, c.precision, p.train.attention, tokens) * tokens
    old_activations = int(L8B.num_layers * per_layer + (per_layer + 2 * ph) + 2 * ph)
    old = (ms.params + ms.grads + ms.master_params + ms.optimizer_states + ms.buffers + CUDA_CONTEXT_BYTES
           + old_activations
           + logits_bytes(L8B, **kw))
    assert c.per_gpu.total < 0.9 * old


def test_json_round_trip_and_table_line():
    p = _plan(L8B, "fsdp_full_shard", gpus=8, seq=2048, accum=2)
    d = p.to_json()
    assert d["peak_phase"] in PHASES and set(d["per_phase"]) == set(PHASES)
    for ph in PHASES:
        assert d["per_phase"][ph]["total"] == sum(v for k, v in d["per_phase"][ph].items() if k != "total")
    assert d["per_gpu"] == d["per_phase"][d["peak_phase"]]
    assert all("per_phase" in a and "peak_phase" in a for a in d["alternatives"])
    back = Plan.from_json(json.loads(json.dumps(d)))
    assert back.chosen.per_phase == p.chosen.per_phase and back.chosen.peak_phase == p.chosen.peak_phase
    assert back.to_json() == d
    line = [ln for ln in render_plan(p).splitlines() if ln.startswith("phases")]
    assert len(line) == 1 and f"peak: {p.chosen.peak_phase}" in line[0]


def test_plan_json_has_phases_and_does_not_import_torch():
    code = ("import sys, json, io, contextlib; from shardtrain.cli import main; f = io.StringIO()\n"
            "with contextlib.redirect_stdout(f): rc = main(['plan', '--model', 'llama-3.1-8b', '--json'])\n"
            "d = json.loads(f.getvalue()); print(d['peak_phase'], sorted(d['per_phase']), 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    peak, *rest = r.stdout.split()
    assert peak in PHASES and "False" == rest[-1], r.stdout


def test_zero3_gathered_params_follow_the_reuse_distance():
    """DeepSpeed ZeRO-3 keeps a gathered param whose next use in the module trace lies within
    stage3_max_reuse_distance (1e9) numel (partitioned_param_coordinator.py __params_to_release).
    1B (1.2B params, tied): between a layer's forward and backward lie 2x the layers above it, so the top
    layers stay gathered after the forward; 8B: no decoder layer (2 x 218M x layers above + 2 x lm_head
    > 1e9) and not the embedding, only the lm_head (reused at once). One rank: the gathered param aliases its
    partition (partition_parameters.py _no_gather_coalesced), nothing is gathered."""
    def fwd_buffers(model, gpus):
        return dict(_plan(model, "zero3", gpus=gpus).chosen.per_phase)["forward"].buffers
    h = L8B.hidden_size
    reduce_bucket, window = 2 * h * h, 2 * (L8B.lm_head_params + int(0.9 * h * h))
    assert fwd_buffers(L8B, 2) == reduce_bucket + window + 2 * L8B.lm_head_params
    assert fwd_buffers(L8B, 1) == reduce_bucket
    h1, per_layer = L1B.hidden_size, L1B.per_layer_params
    kept = sum(1 for i in range(1, L1B.num_layers + 1) if (L1B.num_layers - i) * per_layer * 2 < 10**9)
    assert 0 < kept < L1B.num_layers
    b1 = fwd_buffers(L1B, 2) - 2 * _plan(L1B, "zero3", gpus=2).zero_buckets.reduce_bucket_elements  # 16-bit ipg bucket
    window1 = 2 * (max(per_layer, L1B.embedding_params) + int(0.9 * h1 * h1))
    # the held layers (16-bit, without the persistent norms) + the tied embedding + the prefetch window
    assert b1 - window1 - 2 * L1B.embedding_params == pytest.approx(2 * kept * per_layer, rel=1e-3)


def test_fused_adamw_step_adds_nothing_and_per_tensor_loops_add_two_temporaries():
    """AdamW is torch's fused kernel (runtime/optim.py; emit/deepspeed.py `fused` for ZeRO): in place, so
    the optimizer phase holds model state only. Lion is runtime.optim's per-tensor loop: two fp32
    temporaries of the largest local tensor (L1B: the tied 128256 x 2048 embedding) on top."""
    emb = L1B.vocab_size * L1B.hidden_size
    for strategy, shard in (("ddp", 1), ("fsdp_full_shard", 2), ("zero2", 1)):
        adamw = dict(_plan(L1B, strategy).chosen.per_phase)["optimizer"]
        lion = dict(_plan(L1B, strategy, optimizer="lion").chosen.per_phase)["optimizer"]
        loop = 0 if strategy == "zero2" else 2 * 4 * math.ceil(emb / shard)  # DeepSpeed: FusedLion, in place
        assert lion.buffers - adamw.buffers == pytest.approx(loop, rel=1e-3), strategy


def test_fused_adamw_allocates_no_temporaries_per_pytorchs_memtracker():
    """The claim above against PyTorch's own tracker: a real fused AdamW step on CPU (the kernel
    runtime/optim.py builds) peaks at its parameters + grads + states; the for-loop adds temporaries."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from shardtrain.compiler.specs import Optimizer as Opt
    from shardtrain.runtime.optim import build_optimizer

    def step_peak(opt_factory):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(256, 512)) for _ in range(3)]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = opt_factory(ps)
        opt.step()  # states exist
        mt = MemTracker()
        mt.track_external(*ps, opt)
        with mt:
            before = mt.get_tracker_snapshot()
            opt.step()
        total = lambda snap: sum(d["Total"] for d in snap.values())  # noqa: E731
        return total(mt.get_tracker_snapshot("peak")) - total(before), type(opt).__name__

    fused_extra, _ = step_peak(lambda ps: build_optimizer(Opt.ADAMW, ps, lr=1e-3))
    loop_extra, _ = step_peak(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False))
    assert fused_extra <= 1024, fused_extra                       # step counters at most
    assert loop_extra >= 2 * 4 * 256 * 512 - 1024, loop_extra     # the loop's two temporaries
