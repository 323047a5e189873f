"""Tiled MLP (issue 20 point 2): each decoder layer's MLP computed in N sequence tiles, so that its
intermediate activations (seq × intermediate: gate, up, act·up) exist for one tile at a time.

The method is ALST's (Bekman et al., "Arctic Long Sequence Training", arXiv 2506.13996, §3.2) as
DeepSpeed 0.19.8 ships it (deepspeed/runtime/sequence_parallel/ulysses_sp.py `TiledMLP`): the forward
runs every tile under no_grad and keeps only the MLP input; the backward recomputes one tile at a time
with grad and backprops it, writing that tile's slice of the input gradient. DeepSpeed's class is not
used as is, for three reasons that each change the gradients on some engine here:
- parameter gradients: DeepSpeed lets each tile's backward accumulate into `.grad` and sets
  `ds_grad_is_ready` so ZeRO reduces after the last tile only (stage3.py
  `reduce_independent_p_g_buckets_and_remove_grads`, stage_1_and_2.py likewise); DDP's reducer (and
  FSDP2's) would see the gradient hook fire N times ("marked ready twice"). So on DeepSpeed (every stage;
  under ZeRO-3 the parameters are partitioned when the MLP is entered and could not be autograd inputs)
  the tiles accumulate into `.grad` under those flags, and on DDP/FSDP2 the trainable parameters are
  explicit inputs of the autograd Function whose backward returns their gradients summed over the tiles
  (`torch.autograd.grad`), so each hook fires once, as untiled. The price of the latter: while tile
  i > 0 back-propagates, the running sum and that tile's gradients of the MLP's trainable parameters
  coexist (one extra copy of them, in the parameter dtype; negligible for LoRA).
- RNG: LoRA's adapter dropout draws masks in the MLP projections; the backward restores the RNG state
  of the forward (as torch.utils.checkpoint does), so the recomputed tiles see the same masks.
- autocast: DDP/FSDP2 16-bit runs compute under autocast, which the backward pass does not re-enter;
  the backward re-enters the forward's autocast state (torch.amp.custom_bwd does the same).
The tile count is fixed (empty tiles when the sequence is shorter), so ranks agree on the number of
ZeRO-3 parameter gathers. Not with tensor parallel (DTensor-split MLP): runtime/build.py refuses it.
"""
from __future__ import annotations

import contextlib
import math
import types
from typing import Callable

import torch
from torch import nn

#: the attribute of a decoder layer that holds its MLP (Llama, Mistral, Qwen2/3, Gemma)
MLP_ATTR = "mlp"


def tile_slices(seq_len: int, tiles: int) -> list[slice]:
    """`tiles` contiguous slices covering [0, seq_len) (ceil-sized, the last ones shorter or empty)."""
    step = max(1, math.ceil(seq_len / tiles))
    return [slice(min(i * step, seq_len), min((i + 1) * step, seq_len)) for i in range(tiles)]


def _autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    kinds = {device_type, "cpu"}
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in sorted(kinds)]


def _autocast(state) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for dev, enabled, dtype in state:
        stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled))
    return stack


class _Rng:
    """The CPU (and the input's CUDA device) RNG state at the forward, restored for the recompute."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.devices = [device] if device.type == "cuda" else []
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=self.devices, device_type="cuda" if self.devices else "cpu"):
            torch.set_rng_state(self.cpu)
            for d, s in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(s, d)
            yield


class TiledMLPFunction(torch.autograd.Function):
    """`apply(fn, module, tiles, params_of, ds_flags, x, *params) -> fn(module, x)` computed in `tiles`
    sequence tiles (dim -2). `params`: the module's trainable parameters, whose gradients the backward
    returns summed; empty on DeepSpeed (`ds_flags`: `params_of` then names the parameters whose
    `ds_grad_is_ready` flags hold ZeRO's reduction until the last tile). `params_of()` gives the parameters at backward time
    (FSDP2 re-registers the same unsharded tensors)."""

    @staticmethod
    def forward(ctx, fn, module, tiles, params_of, ds_flags, x, *params):
        ctx.fn, ctx.module, ctx.tiles, ctx.params_of = fn, module, tiles, params_of
        ctx.explicit = not ds_flags
        ctx.rng = _Rng(x.device)
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        # detached: a view taken under no_grad still reports requires_grad (without a grad_fn), which
        # module hooks that watch inputs (torch's ModTracker under run.memory_trace's MemTracker) reject
        xd = x.detach()
        with torch.no_grad():
            outs = [fn(module, xd[..., sl, :]) for sl in tile_slices(x.shape[-2], tiles)]
        return torch.cat(outs, dim=-2)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[5]
        x = x.detach()
        grad_x = torch.zeros_like(x) if need_x else None
        params = [p for p in ctx.params_of()]
        acc: list[torch.Tensor | None] = [None] * len(params)
        slices = tile_slices(x.shape[-2], ctx.tiles)
        with ctx.rng.restored(), _autocast(ctx.autocast):
            for i, sl in enumerate(slices):
                x_t = x[..., sl, :].detach().requires_grad_(need_x)
                g_t = grad_out[..., sl, :]
                if not ctx.explicit:  # DeepSpeed reduces a parameter after its last tile only
                    for p in params:
                        p.ds_grad_is_ready = i == len(slices) - 1
                with torch.enable_grad():
                    y = ctx.fn(ctx.module, x_t)
                if ctx.explicit:
                    inputs = ([x_t] if need_x else []) + params
                    grads = torch.autograd.grad(y, inputs, g_t, allow_unused=True)
                    if need_x:
                        grad_x[..., sl, :] = grads[0]
                        grads = grads[1:]
                    for j, g in enumerate(grads):
                        if g is not None:
                            acc[j] = g if acc[j] is None else acc[j].add_(g)
                else:
                    torch.autograd.backward(y, g_t)  # into x_t.grad and the parameters' .grad
                    if need_x:
                        grad_x[..., sl, :] = x_t.grad
        return (None, None, None, None, None, grad_x, *(acc if ctx.explicit else []))


def _trainable(module: nn.Module) -> Callable[[], list[nn.Parameter]]:
    return lambda: [p for p in module.parameters() if p.requires_grad]


def tiled_forward(orig: Callable, tiles: int, ds_flags: bool):
    """A replacement `forward(self, x)` for an MLP module: `orig(self, x)` in `tiles` sequence tiles."""
    def forward(self, x):
        params_of = _trainable(self)
        params = () if ds_flags else tuple(params_of())
        if not torch.is_grad_enabled() or not (x.requires_grad or params or ds_flags):
            return orig(self, x)  # eval / no grad: nothing to save, nothing to tile for
        return TiledMLPFunction.apply(orig, self, tiles, params_of, ds_flags, x, *params)
    # train.compile: dynamo runs the tiles eagerly (a graph break) instead of tracing the Function's
    # module/callable arguments
    return torch.compiler.disable(forward)


def install_tiled_mlp(layers: list[nn.Module], tiles: int, *, ds_flags: bool) -> int:
    """Tile the MLP of every decoder layer in `layers` (plan.chosen.tiled_mlp_tiles >= 2); returns how
    many. `ds_flags`: the DeepSpeed engine (gradients accumulate in `.grad` under `ds_grad_is_ready`)."""
    if tiles < 2:
        return 0
    n = 0
    for layer in layers:
        mlp = getattr(layer, MLP_ATTR, None)
        if not isinstance(mlp, nn.Module):
            raise ValueError(f"train.tiled_mlp: the decoder layer {type(layer).__name__} has no `{MLP_ATTR}` module "
                             "to tile; set train.tiled_mlp: off for this model")
        mlp.forward = types.MethodType(tiled_forward(type(mlp).forward, tiles, ds_flags), mlp)
        mlp._shardtrain_mlp_tiles = tiles
        n += 1
    return n


def tiled_mlp_count(model: nn.Module) -> int:
    """How many MLPs of `model` run tiled (a probe for the tests and the worker's log line)."""
    return sum(1 for m in model.modules() if getattr(m, "_shardtrain_mlp_tiles", 0) >= 2)
