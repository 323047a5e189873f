"""DDP, FSDP2 and DeepSpeed behind one small interface, so one training loop drives all three.

    eng.forward(batch) -> logits          (autocast / MixedPrecisionPolicy / DeepSpeed engine)
    with eng.micro_step(is_last): ...     (DDP no_sync, FSDP2 set_requires_gradient_sync)
    eng.backward(loss, is_last)
    eng.step(lr) -> grad norm             (clip, optimizer step, zero grads)
    eng.guard, eng.step_applied           (the non-finite guard: see below)
    eng.loss_multiplier                   (DeepSpeed divides the loss by the accumulation steps itself)

Non-finite guard (issue 21): the loop sets ``eng.guard``, a COLLECTIVE ``guard(grad_norm or None) -> bool``
that sums the step's loss and a "this rank's grad norm is not finite" flag over the ranks in one
all-reduce; every rank gets the same answer, so no rank steps alone. ``step`` calls it after clipping
(DDP/FSDP2: the norm is already global) and makes no optimizer update when it says False (the gradients
are zeroed; an fp16 GradScaler still updates its scale). DeepSpeed computes the global norm inside its
own ``step`` and skips a non-finite one itself (stage_1_and_2.py/stage3.py: ``is_invalid_grad_norm`` ->
``overflow``; bf16 through its default ``bf16.check_grad_overflow: true``; fp32 always); the guard checks
the loss before ``ds.step()`` and ``ds.was_step_applied()`` says what happened. ``eng.step_applied`` is
False after a skipped step.

Gradients are averaged over the gradient-reduce ranks by every engine (all ranks for a 1-D mesh; on a
device mesh dp × cp = plan.parallel.grad_reduce: tp peers hold different slices, issue 18), so the loop
scales the summed token loss by grad_reduce / (tokens in the global batch) (× K for DeepSpeed): the
update equals one big batch exactly.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from shardtrain.compiler.specs import Engine, Precision
from shardtrain.runtime.modeling import compute_dtype, decoder_layers


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class NonFiniteUpdateError(RuntimeError):
    """An engine applied an update although the step's loss was not finite (never expected; raised so
    that training does not go on from it)."""


class BaseEngine:
    kind: Engine
    loss_multiplier = 1.0
    grads_set_to_none = True
    #: the loop's collective non-finite check (module docstring); None: every step updates
    guard = None
    #: whether the last ``step`` made an optimizer update
    step_applied = True

    def __init__(self, model: nn.Module, optimizer, *, precision: Precision, grad_clip: float,
                 device: torch.device):
        self.model = model            # unwrapped HF / peft model
        self.module: nn.Module = model  # what forward runs through
        self.optimizer = optimizer
        self.precision = precision
        self.grad_clip = grad_clip
        self.device = device
        self.scaler = None

    # ---------------------------------------------------------------- the loop's interface
    def forward(self, batch: dict) -> torch.Tensor:
        return self.module(**batch).logits

    def micro_step(self, is_last: bool):
        return contextlib.nullcontext()

    def autocast(self):
        """The compute-dtype context the forward runs in (the chunked loss projects under it too)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, lr: float) -> float:
        self.set_lr(lr)
        params = trainable(self.model)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = self.clip(params)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.step_applied = self.guard(norm) if self.guard is not None else True
        if self.step_applied:
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler:
            self.scaler.update()  # after unscale_: an inf/NaN seen there lowers the scale, as on a skip
        self.optimizer.zero_grad(set_to_none=self.grads_set_to_none)
        return float(norm)

    def clip(self, params: list) -> torch.Tensor:
        """Clip the gradients to train.grad_clip (0: measure only); returns the global norm."""
        return torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else math.inf)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def close(self) -> None:
        pass


class DDPEngine(BaseEngine):
    """torch DDP, fp32 params with autocast to the 16-bit compute dtype; no_sync on all micro-steps
    but the last; gradient_as_bucket_view=True (grads are the buckets, memory.py)."""
    kind = Engine.DDP
    # gradients stay views into the DDP buckets across steps (set_to_none would make autograd
    # allocate fresh gradients on the next no_sync micro-step, copied into the buckets later)
    grads_set_to_none = False

    def __init__(self, model, optimizer, **kw):
        super().__init__(model, optimizer, **kw)
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev = self.device
        # forward_sync_buffers=False: DDP would otherwise broadcast every buffer from rank 0 at each forward
        # (a collective per micro-step, torch/nn/parallel/distributed.py _pre_forward); a causal LM's
        # buffers (rotary inv_freq) are computed identically on every rank and never trained (issue 11)
        self.module = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                          gradient_as_bucket_view=True, init_sync=False, forward_sync_buffers=False)
        if self.precision is Precision.FP16:
            self.scaler = torch.amp.GradScaler(dev.type)

    def forward(self, batch):
        if not self.precision.autocast:   # fp32, or pure bf16: the params are already in the compute dtype
            return self.module(**batch).logits
        with torch.autocast(self.device.type, dtype=compute_dtype(self.precision)):
            return self.module(**batch).logits

    def micro_step(self, is_last):
        return contextlib.nullcontext() if is_last else self.module.no_sync()

    def autocast(self):
        if not self.precision.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=compute_dtype(self.precision))


class FSDP2Engine(BaseEngine):
    """`fully_shard` on every decoder layer and the root; MixedPrecisionPolicy(param=16-bit,
    reduce=fp32); reshard_after_forward per strategy; CPUOffloadPolicy when settings ask for it;
    `set_requires_gradient_sync(False)` on non-final micro-steps when the plan defers the sync."""
    kind = Engine.FSDP

    def __init__(self, model, optimizer_factory, *, settings, full_state: dict | None, mesh=None, **kw):
        """`mesh`: runtime/mesh.py RankMesh (plan.parallel), None for fsdp.json's 1-D / hybrid mesh."""
        from shardtrain.runtime.fsdp_wrap import shard_model
        super().__init__(model, None, **kw)
        self.mesh = mesh
        dev = self.device
        offloaded = settings.cpu_offload
        self.cpu_offload = offloaded   # fsdp_offload: sharded params, grads and optimizer states on the host
        units = decoder_layers(model, settings.wrap_class)
        if not units:
            raise ValueError(f"fsdp.json wrap_class {settings.wrap_class!r} matches no module of the model")
        buffers = {n: b for n, b in model.named_buffers()}
        if mesh is not None and mesh.dims.tp > 1 and full_state is not None:
            # TP's distribute_tensor scatters a real tensor from the tp group's first rank, and a meta one
            # sends nothing: rank 0 would wait on its meta peers. Every rank splits meta tensors; rank 0's
            # full state dict fills the shards below (as on the 1-D path)
            model.to("meta")
        shard_model(model, settings, dev.type, units, mesh=mesh)
        if any(t.is_meta for t in model.parameters()) or full_state is not None:
            self._load_full(model, full_state, offloaded, buffers)
        self.defer_sync = settings.defer_grad_sync
        self.optimizer = optimizer_factory(trainable(model))
        if self.precision is Precision.FP16:
            self.scaler = torch.amp.GradScaler(dev.type)

    def _load_full(self, model, full_state, offloaded, buffers: dict):
        """Meta ranks allocate their shards; rank 0's full state dict is broadcast into them. `buffers`:
        the model's buffers before sharding (rank 0's are real)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        model.to_empty(device="cpu" if offloaded else self.device)
        set_model_state_dict(model, full_state or {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # non-persistent buffers (rotary inv_freq) are not in the state dict: copy from rank 0
        for n, b in model.named_buffers():
            if dist.get_rank() == 0 and n in buffers and not buffers[n].is_meta and b.data_ptr() != buffers[n].data_ptr():
                b.copy_(buffers[n])
            dist.broadcast(b.data, src=0)
        if hasattr(model, "tie_weights"):
            model.tie_weights()

    def micro_step(self, is_last):
        self.model.set_requires_gradient_sync(is_last or not self.defer_sync)
        return contextlib.nullcontext()

    def clip(self, params):
        if self.mesh is None or self.mesh.dims.tp == 1:
            return super().clip(params)
        # TP-split and replicated parameters are DTensors on different meshes (runtime/mesh.py)
        from shardtrain.runtime.mesh import clip_grad_norm
        return clip_grad_norm(params, self.grad_clip)


class DeepSpeedEngine(BaseEngine):
    """`deepspeed.initialize` from the emitted ds_config.json. DeepSpeed casts the module to 16-bit,
    keeps fp32 master partitions, clips, and accumulates itself (backward divides by the
    accumulation steps; step() is called every micro-step and acts at the boundary).

    Context parallel (issue 18): with `sequence_parallel_size` sp > 1 in the config, DeepSpeed's own
    Ulysses (ALST) runs the attention and its mpu goes to `initialize` (runtime/ds_sequence_parallel.py);
    the loop feeds each rank its `context_parallel.cp_slice`. ZeRO-1/2 sum gradients over the sp ranks
    of a sequence, so their loss multiplier carries 1/sp (ZeRO-3's reduce-scatter averages: no factor).

    Tensor parallel (issue 18): with `tensor_parallel.autotp_size` tp > 1 (ZeRO-1/2), `initialize` shards the
    model with DeepSpeed's AutoTP over tp groups of consecutive ranks (the mesh's, checked) and reduces
    gradients over the dp ranks only (a mean over dp = grad_reduce: no factor); runtime/ds_autotp.py."""
    kind = Engine.DEEPSPEED

    def __init__(self, model, optimizer, *, ds_config: dict, grad_accum: int, zero_stage: int,
                 offload_optimizer: bool, offload_params: bool, **kw):
        """`ds_config`: the plan's copy (emitted from the plan when the run dir was written; build.py
        refuses a ds_config.json that differs); `optimizer`: None when the config's optimizer block builds it."""
        import deepspeed
        super().__init__(model, optimizer, **kw)
        self.zero_stage, self.offload_optimizer, self.offload_params = zero_stage, offload_optimizer, offload_params
        from shardtrain.runtime import ds_sequence_parallel as dsp
        from shardtrain.runtime import ds_autotp
        self.sp = dsp.sp_size(ds_config)
        self.tp = ds_autotp.check_config(ds_config, zero_stage, self.sp)
        #: every parameter's shape before AutoTP splits it (ds_autotp.full_fp32_params gathers to it)
        self.full_shapes = {n: p.shape for n, p in model.named_parameters()}
        self.loss_multiplier = float(grad_accum) * dsp.loss_scale_for_sp(self.sp, zero_stage, dsp.reduce_scatter(ds_config))
        args = dict(model=model, model_parameters=trainable(model), config=ds_config)
        if optimizer is not None:
            args["optimizer"] = optimizer
        from shardtrain.runtime.dist import init_deepspeed_comm
        init_deepspeed_comm()  # before initialize: one place sets up deepspeed.comm (and its shm cleanup)
        mpu = dsp.setup_alst(model, ds_config)  # None without sequence parallel
        if mpu is not None:
            args["mpu"] = mpu
        self.ds, self.optimizer, _, _ = deepspeed.initialize(**args)
        self.module = self.ds
        if self.tp > 1:
            ds_autotp.check_groups(self.tp)
            ds_autotp.check_splits(model, self.full_shapes, self.tp)

    def forward(self, batch):
        return self.ds(**batch).logits

    def backward(self, loss, is_last):
        self.ds.backward(loss)
        if not is_last:
            self.ds.step()  # DeepSpeed counts micro-steps; no optimizer step off the boundary

    def step(self, lr):
        self.set_lr(lr)  # the emitted config has no scheduler block: the loop's schedule drives the LR
        assert self.ds.is_gradient_accumulation_boundary(), "DeepSpeed accumulation out of step with the plan"
        # the loss check (collective) before ds.step(); DeepSpeed skips a non-finite grad norm itself, and
        # ds.step() must run at every boundary (it resets its micro-step count and the gradients)
        loss_ok = self.guard(None) if self.guard is not None else True
        self.ds.step()
        self.step_applied = bool(self.ds.was_step_applied())
        raw = self.ds.get_global_grad_norm()  # None when DeepSpeed computes no norm
        norm = float(raw) if raw is not None else float("nan")
        if self.step_applied and (not loss_ok or (raw is not None and not math.isfinite(norm))):
            # never expected (DeepSpeed's check skips such steps); stop rather than train on from it
            raise NonFiniteUpdateError("DeepSpeed applied an optimizer update although the step's loss or gradient "
                                       "norm is not finite; the parameters are no longer trustworthy: resume from "
                                       "the last checkpoint (it is intact) with a lower train.lr or after checking "
                                       "the data")
        return norm

    def set_lr(self, lr):
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def close(self):
        try:
            self.ds.destroy()
        except Exception:  # noqa: BLE001 - best effort teardown between scenarios
            pass
        if self.sp > 1:
            from shardtrain.runtime.ds_sequence_parallel import teardown
            teardown()
        if self.tp > 1:
            from shardtrain.runtime import ds_autotp
            ds_autotp.teardown()
