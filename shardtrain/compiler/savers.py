"""The long-context memory savers of ALST (Arctic Long Sequence Training, arXiv:2506.13996 §3): tiled MLP and
checkpoint offload to host — their bytes, their FLOPs, and which of them the planner tries. Pure: no torch.

Tiled MLP (DeepSpeed 0.19.8 deepspeed/runtime/sequence_parallel/ulysses_sp.py `TiledMLP`, an
autograd.Function around the MLP forward): its forward runs the MLP tile by tile under `torch.no_grad()`
and saves only its input x (`ctx.save_for_backward(x)`); its backward allocates `x_grad = zeros_like(x)`
and, tile by tile, recomputes the MLP forward with grad and back-propagates the tile's slice of the
incoming gradient. So, per decoder layer and token:
  - saved for backward: the MLP input only — the intermediates (gate, up, silu(gate), their product:
    4·I·p bytes per token, activations.py's "8I" for p = 2) are no longer saved, in every layer (it is its
    own recompute, so it helps with or without layer checkpointing);
  - backward working set: one tile's intermediates recomputed (4·I·p) plus their gradients (down_proj's
    input gradient, then silu's and up's: 3·I·p) for tokens / N tokens, and the full x_grad buffer (the
    width of x: h per token, in x's dtype) next to the incoming gradient.
  - time: the MLP forward runs once more per step ("the forward occurs twice each iteration. And if you're
    using activation checkpointing it then occurs trice", TiledMLP's docstring): +2·3·h·I FLOPs per token
    per layer (gate, up, down; per routed expert for MoE), cost.py.
  - tiles: DeepSpeed's example (TiledMLP docstring, `tiled_mlp_forward`) and ALST use
    `num_shards = math.ceil(seqlen / hidden)` on the rank's own sequence (seq_len / cp after the Ulysses
    split); we take at least 2 (1 tile is "off").
Checkpoint offload (ALST §3 "activation checkpoint offload to CPU"): each checkpointed layer keeps one tensor
between forward and backward, its input (p·h per token; fp32 under DDP autocast): those move to host RAM
(pinned on CUDA) in the forward and come back for the layer's recompute. The device keeps one layer's input
(the copy in flight in the forward, the layer recomputing in the backward) and the next one prefetched in
the backward. Host RAM per rank: the inputs of every checkpointed layer; PCIe: two transfers per
micro-step, counted exposed as activation offload is (cost.py).
With activation_offload cpu it is redundant: save_on_cpu (torch.autograd.graph) packs every tensor saved in
the forward, and torch/utils/checkpoint.py `_CheckpointFrame` saves a checkpointed layer's inputs through
the active saved-tensor hooks — so the checkpointed inputs are already on the host. The planner then plans
activation offload alone (never both: the same bytes would be counted, and moved, twice;
config/ignored.py warns when both are set).
"""
from __future__ import annotations

from dataclasses import dataclass

from shardtrain.compiler.activations import (MLP_SAVED_INTERMEDIATES, hidden_per_rank, mlp_intermediates_bytes_per_token,
                                             mlp_width_per_rank)
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.specs import ActivationOffload, CkptOffload, ParallelDims, Precision, TrainSpec

tiled_saved_reduction_per_token = mlp_intermediates_bytes_per_token
"""Bytes per token per layer that a tiled MLP no longer saves for backward (its intermediates)."""
MLP_TILE_WORKING_INTERMEDIATES = 7
"""One tile's backward: its 4 recomputed intermediates + 3 gradients (down_proj input, silu and up), I wide."""


def auto_tiles(model: ModelSpec, seq_len: int, parallel: ParallelDims | None = None) -> int:
    """DeepSpeed/ALST's tile count ceil(seqlen / hidden_size) on the rank's sequence (seq_len / cp), at least 2."""
    cp = parallel.cp if parallel is not None else 1
    local = -(-seq_len // cp)
    return max(2, -(-local // model.hidden_size))


def tile_working_bytes(model: ModelSpec, precision: Precision, tokens: int, tiles: int,
                       parallel: ParallelDims | None = None, x_elem_bytes: int | None = None) -> int:
    """Extra bytes of a tiled MLP's backward (module docstring): one tile's intermediates + gradients, and
    x_grad (zeros_like(x), x_elem_bytes per element: fp32 under DDP autocast). 0 when untiled."""
    if tiles <= 1:
        return 0
    p = precision.param_bytes
    x_elem = x_elem_bytes or p
    tile_tokens = -(-tokens // tiles)
    return (p * MLP_TILE_WORKING_INTERMEDIATES * mlp_width_per_rank(model, parallel) * tile_tokens
            + x_elem * hidden_per_rank(model, parallel) * tokens)


def ckpt_input_bytes(model: ModelSpec, precision: Precision, tokens: int, parallel: ParallelDims | None = None,
                     x_elem_bytes: int | None = None) -> int:
    """One checkpointed layer's input on one rank (what checkpoint offload moves per layer)."""
    return (x_elem_bytes or precision.param_bytes) * hidden_per_rank(model, parallel) * tokens


def mlp_forward_flops_per_token(model: ModelSpec) -> float:
    """One MLP forward over all layers, per token (gate, up, down: 3 matmuls of h·I; per routed expert):
    the recompute a tiled MLP adds to every step."""
    k = model.experts_per_token if model.is_moe else 1
    return 2.0 * 3 * model.hidden_size * model.intermediate_size * k * model.num_layers


@dataclass(frozen=True)
class Savers:
    """One combination of the savers the planner tries on a (strategy, mesh) pair."""
    activation_offload: ActivationOffload = ActivationOffload.NONE
    tiles: int = 1
    """MLP sequence tiles (1 = untiled)."""
    ckpt_offload: bool = False
    """Checkpointed layer inputs in host RAM."""


def saver_options(model: ModelSpec, train: TrainSpec, parallel: ParallelDims | None = None) -> list[Savers]:
    """The saver combinations to try, cheapest first (the planner still ranks by step time): none; tiled
    MLP; checkpoint offload; both; then activation offload (a permission, train.activation_offload cpu),
    with or without tiles but never with checkpoint offload (it moves those inputs already)."""
    t = train.tiled_mlp
    if t is None:
        # MoE: forced only; tensor parallel: never (the runtime tiles a whole MLP, not a tp shard:
        # runtime/modeling.py refuses tiled_mlp_tiles > 1 with parallel.tp > 1)
        no_tiles = model.is_moe or (parallel is not None and parallel.tp > 1)
        tiles = [1] if no_tiles else [1, auto_tiles(model, train.seq_len, parallel)]
    else:
        tiles = [t]
    act_cpu = train.activation_offload is ActivationOffload.CPU
    if train.ckpt_offload is CkptOffload.AUTO:
        ck = [False, True]
    else:
        ck = [train.ckpt_offload is CkptOffload.CPU and not act_cpu]
    out = [Savers(ActivationOffload.NONE, n, c) for c in ck for n in tiles]
    if act_cpu:
        out += [Savers(ActivationOffload.CPU, n, False) for n in tiles]
    return out


def tiled_mlp_mesh_reason(train: TrainSpec, parallel: ParallelDims) -> str | None:
    """Why a forced tiled MLP cannot run on this mesh (with the fix), or None: the runtime tiles a whole MLP's
    sequence, not a tensor-parallel shard of it (runtime/modeling.py refuses tp > 1, DeepSpeed AutoTP too)."""
    if train.tiled_mlp is not None and train.tiled_mlp > 1 and parallel.tp > 1:
        return (f"train.tiled_mlp: {train.tiled_mlp} cannot run with tensor parallel (parallel.tp {parallel.tp}): "
                "the tiled MLP runs on a whole MLP, not a tp shard; set tiled_mlp: auto or off, or parallel.tp: 1")
    return None


def savers_only_shrink(model: ModelSpec, precision: Precision, tokens: int, tiles: int, n_ck: int,
                       parallel: ParallelDims | None = None) -> bool:
    """Whether each saver of a combination can only lower the device bytes at this point, so that when the
    most-saving combination does not fit on the GPU, no cheaper one does (the planner's pruning): a tiled
    MLP drops 4·I per token of the recomputed layer and adds one tile (7·I per tile token) and x_grad (h, in
    fp32 at worst); checkpoint offload drops n_ck - 1 inputs and adds one (the prefetch), so needs n_ck >= 2."""
    p = precision.param_bytes
    w = mlp_width_per_rank(model, parallel)
    tile_ok = tiles <= 1 or (MLP_SAVED_INTERMEDIATES * w * p * tokens
                             >= MLP_TILE_WORKING_INTERMEDIATES * w * p * -(-tokens // tiles)
                             + 4 * hidden_per_rank(model, parallel) * tokens)
    return tile_ok and n_ck >= 2


def _offload_level(sv: Savers) -> int:
    """0 none, 1 checkpointed inputs, 2 every saved activation (a superset of 1's bytes and PCIe time)."""
    return 2 if sv.activation_offload is ActivationOffload.CPU else int(sv.ckpt_offload)


def dominates(a: Savers, b: Savers) -> bool:
    """Whether ``b`` uses every saver ``a`` does (so ``b`` is no faster than ``a`` at the same point and,
    where savers_only_shrink holds, needs no more device memory): the same tiles or ``a`` untiled, and at
    least ``a``'s offload."""
    return (a.tiles == 1 or a.tiles == b.tiles) and _offload_level(a) <= _offload_level(b)
