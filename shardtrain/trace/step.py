"""Trace one plan's training step on the CPU under FakeTensorMode (no real memory, no GPU).

What is traced is what the runtime really runs (shardtrain.runtime.modeling / engines / worker):
the HF model built from the plan's config on the meta device (runtime.modeling.build_base policy:
fp32 trainable params for DDP/FSDP full fine-tuning, 16-bit frozen base + fp32 adapters for LoRA via
runtime.modeling.apply_lora), checkpointing via runtime.modeling.enable_checkpointing, FSDP2
`fully_shard` per decoder layer + root with the plan's emitted FsdpSettings (mesh, MixedPrecisionPolicy,
reshard_after_forward), DDP's autocast compute, the worker's loss (runtime/loss.py TokenLoss: full fp32
cross-entropy or the chunked loss) with the plan's tiled MLP and checkpoint offload (trace/savers.py;
offload's host copies are filed apart from the device figures and reported as the runtime stash counts
them), backward, clip_grad_norm_, optimizer.step and zero_grad with the engine's set_to_none.
The process group is torch's "fake" backend (torch/testing/_internal/distributed/fake_pg.py) of the
plan's world size, so collectives return immediately with correctly-shaped outputs.

On a device mesh (plan.parallel beyond data parallel, issue 18) the FSDP2 model is built as the
runtime builds it (trace/mesh.py): DTensor tensor parallel from the model's own TP plan, fully_shard
over dp_shard × cp (HSDP over dp_replicate), Ulysses cp with rank 0's s/cp token slice and shifted
labels (runtime.context_parallel.shifted_ce_sum); the trace is rank 0's. Ring cp is refused (no CPU
kernel), DDP / DeepSpeed with tp or cp likewise (their analytic numbers stand).

Trackers (torch/distributed/_tools): FSDPMemTracker for FSDP2 (categorises sharded/unsharded params
and grads, all-gather and reduce-scatter buffers), MemTracker for DDP/single device. Peaks per phase
are read by resetting the tracker's peak between phases (MemTracker keeps `_peak_mem`/`_peak_mem_snap`
per device; there is no public reset, see mem_tracker.py _update_peak_stats).

DDP is traced unwrapped: with gradient_as_bucket_view=True (runtime.engines.DDPEngine) the gradients
ARE the reducer's buckets (torch/csrc/distributed/c10d/reducer.cpp initialize_bucket_views), allocated
once in C++ and never freed (zero_grad(set_to_none=False)); the all-reduce is in place. The unwrapped
model with persistent .grad tensors has exactly that footprint; the 2×25 MiB in-flight buckets are the
plan's `buffers` term (untraced).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch import nn

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import CpMode, Engine, Method, Optimizer, Precision, Runner

PHASES = ("forward", "backward", "optimizer")


class TraceError(ValueError):
    """The plan cannot be traced (one line saying why and what stands instead)."""


def check_traceable(plan: Plan) -> None:
    c = plan.chosen
    if c.strategy.engine is Engine.DEEPSPEED:
        raise TraceError(f"--trace: {c.strategy.value} runs DeepSpeed ZeRO, whose internal buffers cannot be "
                         "traced under FakeTensorMode; its analytic numbers (checked against the real engine "
                         "in tests/test_truth_engines.py) stand. Trace ddp or an fsdp_* strategy instead")
    if c.strategy.value == "fsdp_offload":
        raise TraceError("--trace: fsdp_offload keeps the sharded state in host memory (CPUOffloadPolicy), which "
                         "the device tracker would count as GPU memory; its analytic numbers (checked against the "
                         "real engine in tests/runtime/test_peak_truth.py) stand. Trace fsdp_full_shard instead")
    if c.method is Method.QLORA:
        raise TraceError("--trace: QLoRA's bitsandbytes 4-bit kernels cannot run under FakeTensorMode; "
                         "the analytic numbers stand (use --method lora to trace the 16-bit equivalent)")
    if getattr(getattr(c, "activation_offload", None), "value", "none") != "none":
        raise TraceError("--trace: activation offload (runtime/loss.py) is not traced yet; its analytic terms "
                         "stand (trace with train.activation_offload: none)")
    par = plan.parallel
    if not par.is_data_parallel_only and c.strategy.engine is not Engine.FSDP:
        raise TraceError(f"--trace: the mesh {par.label()} is traced on the FSDP2 engine only (DTensor TP, "
                         f"Ulysses CP); {c.strategy.value} with tp/cp keeps its analytic numbers")
    if par.cp > 1 and par.cp_mode is CpMode.RING:
        raise TraceError(f"--trace: ring context parallel (cp {par.cp}) runs torch's context_parallel, which has "
                         "no CPU kernel (flash/efficient attention only), so it cannot be traced here; its "
                         "analytic numbers stand (trace the same mesh with cp_mode ulysses)")
    if c.optimizer is Optimizer.ADAMW8BIT:
        raise TraceError("--trace: bitsandbytes 8-bit AdamW cannot run under FakeTensorMode; "
                         "trace with --optimizer adamw")


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """torch's in-process fake backend: every rank-local collective is a no-op with real shapes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise TraceError("--trace: a process group is already initialised in this process; "
                         "run the trace in a fresh process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _hf_config(plan: Plan):
    """The model's own config.json (preset, config path or checkpoint dir: emit/runtime.py model_ref),
    else the plan's shape (`--params` plans: ModelSpec.to_hf_config, llama layouts)."""
    from transformers import AutoConfig
    from shardtrain.config.presets import load_model_config
    raw = None
    for ref in (getattr(plan.model, "source", None), plan.model.name):
        try:
            raw = dict(load_model_config(ref)[0]) if ref else None
        except (ValueError, OSError):
            raw = None
        if raw is not None:
            break
    if raw is None:
        try:
            raw = dict(plan.model.to_hf_config())
        except ValueError as e:
            raise TraceError(f"--trace: {e}") from None
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config.use_cache = False
    return config


def _build_meta(plan: Plan) -> nn.Module:
    """The runtime's model on the meta device (runtime.modeling.build_base/apply_lora policy)."""
    from shardtrain.runtime.modeling import apply_lora, build_base, build_dtype, enable_checkpointing, ModelSource
    c, t = plan.chosen, plan.train
    attention = "sdpa" if t.attention.value == "flash" else t.attention.value  # no flash kernels on CPU
    src = ModelSource(config=_hf_config(plan), weights_dir=None, model_dir=None)
    model = build_base(src, build_dtype(c.strategy.engine, c.method, c.precision), seed=0, attention=attention,
                       meta=True)
    from shardtrain.runtime.packed_attention import install_packed
    install_packed(model)   # as runtime/build.py: no [s, s] mask (FakeTensorMode made transformers build one)
    # checkpoint offload: the runtime's stash (trace/savers.py host_resident files its copies as host memory)
    enable_checkpointing(model, c.gradient_checkpointing, t.selective_every, ckpt_offload=c.ckpt_offload,
                         device_type="cpu")
    if c.method is not Method.FULL:
        lo = t.lora
        with torch.device("meta"):
            model = apply_lora(model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout,
                               targets=tuple(plan.lora_targets or lo.targets), seed=0)
    from shardtrain.trace.savers import install_tiled
    install_tiled(plan, model)   # after LoRA, as runtime/modeling.py build_model
    return model


def _optimizer(plan: Plan, params):
    """The runtime's optimizer (runtime/optim.py): fused AdamW, which MemTracker follows under fake mode
    (its step allocates nothing, as compiler/phases.py assumes; tests/test_phases.py checks it for real)."""
    from shardtrain.runtime.optim import build_optimizer
    return build_optimizer(plan.chosen.optimizer, params, lr=1e-4)


def _reset_peak(mt) -> None:
    from shardtrain.trace.trackers import HOST
    mt._peak_mem_snap = copy.deepcopy({d: snap for d, snap in mt._curr_mem_snap.items() if d is not HOST})
    mt._peak_mem = {dev: snap.get("Total", 0) for dev, snap in mt._peak_mem_snap.items()}


def _read_peak(mt) -> dict[str, int]:
    snap = mt.get_tracker_snapshot("peak")
    out: dict[str, int] = {}
    for dev_snap in snap.values():
        for k, v in dev_snap.items():
            key = "total" if k == "Total" else str(getattr(k, "value", k))
            out[key] = out.get(key, 0) + int(v)
    return out


def trace_step(plan: Plan, *, steps: int = 2) -> tuple[dict[str, dict[str, int]], str, int, dict[str, int]]:
    """Per-phase peak bytes per category of rank 0 over `steps` optimizer steps (max over steps and
    micro-steps), the tracker's name, the world size, and host memory the step used instead of device
    memory ({"ckpt_offload": the stash's bytes of one micro-step, "ckpt_offload_peak": the tracked peak
    of its live copies}; empty without checkpoint offload)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from shardtrain.runtime.engines import trainable
    from shardtrain.runtime.modeling import compute_dtype, decoder_layers
    from shardtrain.runtime.ckpt_offload import ckpt_stash
    from shardtrain.trace.savers import host_resident, token_loss
    from shardtrain.trace.mesh import MeshTraceError, clip, cp_inputs
    check_traceable(plan)
    c, t = plan.chosen, plan.train
    W = c.world_size
    fsdp = c.strategy.engine is Engine.FSDP
    accum = min(c.grad_accum_steps, 2)   # the first and a later micro-step differ; more repeat the later one
    phases: dict[str, dict[str, int]] = {p: {} for p in PHASES}

    def keep(phase: str, peak: dict[str, int]) -> None:
        if peak.get("total", 0) >= phases[phase].get("total", -1):
            phases[phase] = peak

    with fake_process_group(W):
        model = _build_meta(plan)
        if fsdp:
            from shardtrain.emit.fsdp import fsdp_settings
            from shardtrain.trace.mesh import shard_like_runtime
            st = fsdp_settings(plan)
            try:   # the runtime's TP / FSDP2 / Ulysses on plan.parallel (trace/mesh.py)
                shard_like_runtime(model, st, plan.parallel, decoder_layers(model, st.wrap_class))
            except MeshTraceError as e:
                raise TraceError(str(e)) from None
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            if hasattr(model, "tie_weights"):   # to_empty makes new Parameters (runtime.modeling re-ties too)
                model.tie_weights()
            opt = _optimizer(plan, trainable(model))
            ids = torch.randint(0, plan.model.vocab_size, (c.micro_batch_size, t.seq_len))
            fwd, shift_labels = cp_inputs(ids, plan.parallel)   # cp: this rank's s/cp tokens
            ids = fwd["input_ids"]
            if fsdp:
                from shardtrain.trace.trackers import GlobalPeakFSDPMemTracker
                mt = GlobalPeakFSDPMemTracker(model, opt)
                mt.track_inputs((ids,))
                tool = "FSDPMemTracker"
            else:
                from shardtrain.trace.trackers import FrozenSafeMemTracker
                mt = FrozenSafeMemTracker()
                mt.track_external(model, opt, ids)
                tool = "MemTracker"
            def autocast():   # the engine's compute context (DDP: autocast; FSDP2: MixedPrecisionPolicy)
                return (torch.autocast("cpu", dtype=compute_dtype(c.precision))
                        if not fsdp and c.precision.autocast else contextlib.nullcontext())
            loss_of = token_loss(plan, model, c.strategy.engine, autocast, torch.device("cpu"))
            stash = ckpt_stash(model)
            if stash is not None:
                host_resident(stash, mt)
            host: dict[str, int] = {}
            with mt:
                for _ in range(steps):
                    for k in range(accum):
                        last = k == accum - 1
                        if fsdp:
                            model.set_requires_gradient_sync(last or not c.fsdp_defer_grad_sync)
                        mt.reset_mod_stats()   # FSDPMemTracker refuses a second forward otherwise
                        _reset_peak(mt)
                        if getattr(t, "runner", Runner.SHARDTRAIN) is not Runner.SHARDTRAIN and shift_labels is None:
                            # the HF runners (Trainer / accelerate): model(input_ids, labels=...) computes the
                            # loss inside the root unit's forward (compiler/runner.py); the outputs are
                            # dropped before backward, as Trainer.compute_loss returns only the loss
                            with autocast():
                                loss = model(**fwd, labels=ids).loss
                        else:   # runtime/loss.py TokenLoss: full or chunked, as the worker runs it
                            if stash is not None:
                                stash.reset()
                            loss = (loss_of(fwd, ids) if shift_labels is None
                                    else loss_of(fwd, shift_labels, shifted=True))
                            if stash is not None:
                                host["ckpt_offload"] = max(host.get("ckpt_offload", 0), stash.bytes)
                        keep("forward", _read_peak(mt))
                        _reset_peak(mt)
                        loss.backward()
                        del loss
                        keep("backward", _read_peak(mt))
                    _reset_peak(mt)
                    params = trainable(model)
                    clip(params, plan.parallel)   # the engine's clip (across meshes when tp > 1)
                    opt.step()
                    # runtime.engines: DDP keeps grads as bucket views (set_to_none=False)
                    opt.zero_grad(set_to_none=fsdp)
                    # the first step's lazy state init is over-counted under fake mode (DTensor
                    # zeros_like); the steady state is the last step's optimizer phase
                    phases["optimizer"] = _read_peak(mt)
            if stash is not None:
                host["ckpt_offload_peak"] = mt.host_peak
    return phases, tool, W, host

