"""Checkpoint offload to host (issue 20 point 3): the inputs of each checkpointed decoder layer kept in
host memory (pinned on CUDA) and copied back for the recompute.

Why wrapping the checkpoint call is exactly that: torch's non-reentrant checkpoint
(torch/utils/checkpoint.py `_checkpoint_without_reentrant_generator`) saves the region's tensor inputs
with `_CheckpointFrame.save_inputs` — a SavedVariable made *before* it pushes its own saved-tensor hooks
(`_checkpoint_hook`), so the hooks active at the call pack them — and everything saved inside the region
goes to its own hooks (the innermost pair wins), i.e. is dropped and recomputed. HF calls
`layer._gradient_checkpointing_func(partial(forward, **kwargs), hidden_states)`, so the tensors packed
here are the hidden states entering each checkpointed layer: seq × hidden × layers bytes, the term that
dominates at long sequence. Transformers' own `activation_checkpointing_enable(offload=True)` does the
same with `save_on_cpu(pin_memory=True)`, which fails on a CPU-only host (no pinned memory) and counts
nothing; this stash pins on CUDA only and records what moved (the test asserts it is only the layer
inputs, and the worker logs the bytes).

With `train.activation_offload: cpu` the whole forward runs under runtime/loss.py `offload_activations`,
whose hooks already pack these inputs: the stash is then not installed (the planner counts them once).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor


@dataclass
class HostStash:
    """Saved-tensor hooks that copy each packed tensor to host memory (pinned when `pin_memory`) and back
    to its device at unpack. Parameters (and views of them), sparse tensors and tensor subclasses (a
    DTensor's storage is its local shard) stay where they are. Also the hooks of runtime/loss.py
    `offload_activations` (train.activation_offload: cpu, over the whole forward)."""
    pin_memory: bool = False
    tensors: int = 0
    """tensors packed since the last `reset` (one per checkpointed layer per micro-step)"""
    bytes: int = 0
    """their bytes"""
    shapes: list = field(default_factory=list)
    """their shapes (kept for the first 64, for the tests)"""

    def pack(self, t: torch.Tensor):
        if (isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter) or t.is_sparse
                or (type(t) is not torch.Tensor and not isinstance(t, FakeTensor))):
            # a tensor subclass (DTensor): its local shard, not its size; FakeTensor (plan --trace) is a plain one
            return (None, t)
        self.tensors += 1
        self.bytes += t.numel() * t.element_size()
        if len(self.shapes) < 64:
            self.shapes.append(tuple(t.shape))
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.pin_memory)
        host.copy_(t, non_blocking=self.pin_memory)
        return (t.device, host)

    def unpack(self, packed):
        device, t = packed
        return t if device is None else t.to(device, non_blocking=self.pin_memory)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def reset(self) -> None:
        self.tensors = self.bytes = 0
        self.shapes.clear()


def offloading(checkpoint_fn, stash: HostStash):
    """`checkpoint_fn(function, *args, **kw)` with the region's inputs packed by `stash`."""
    @functools.wraps(checkpoint_fn)
    def run(function, *args, **kwargs):
        with stash.hooks():
            return checkpoint_fn(function, *args, **kwargs)
    return run


def install_ckpt_offload(model: nn.Module, device_type: str) -> HostStash | None:
    """Wrap the checkpoint function of every checkpointed layer of `model` (after
    `activation_checkpointing_enable`); returns the shared stash, None when no layer is checkpointed."""
    stash = HostStash(pin_memory=device_type == "cuda")
    n = 0
    for m in model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if fn is not None and getattr(m, "gradient_checkpointing", False):
            m._gradient_checkpointing_func = offloading(fn, stash)
            n += 1
    if n == 0:
        return None
    model._shardtrain_ckpt_stash = stash
    return stash


def ckpt_stash(model: nn.Module) -> HostStash | None:
    """The stash installed on `model` (walks DDP/peft/DeepSpeed wrappers' `module`/`base_model`)."""
    m = model
    for _ in range(5):
        if m is None:
            return None
        s = getattr(m, "_shardtrain_ckpt_stash", None)
        if s is not None:
            return s
        m = getattr(m, "module", None) or getattr(m, "base_model", None) or getattr(m, "model", None)
    return None
