"""The plan's device mesh applied to the traced model, through the runtime's OWN code (what
`shardtrain launch` runs on the FSDP2 engine, runtime/build.py + engines.FSDP2Engine), on torch's fake
process group of plan.parallel.world ranks; the trace is rank 0's view:

1. runtime/mesh.py `RankMesh(plan.parallel)`: `init_device_mesh` over (dp_replicate, dp_shard, cp, tp)
   with MESH_DIM_NAMES and the flattened "dp", "dp_shard_cp", "dp_cp" sub-meshes — built when the
   mesh is more than data parallel or HSDP, as build.py does (a 1-D plan keeps fsdp.json's mesh);
2. runtime/fsdp_wrap.py `shard_model(..., mesh=)`: tensor parallel first (runtime/tensor_parallel.py:
   DTensor `parallelize_module` from the model's own `base_model_tp_plan`, Llama's q/k/v/gate/up
   colwise and o/down rowwise, no sequence parallel), then `fully_shard` per decoder layer + root over
   dp_shard_cp, or the 2-D (dp_replicate, dp_shard_cp) mesh for HSDP;
3. cp (Ulysses): runtime/context_parallel.py `install_ulysses` on the cp group (the fake backend's
   all_to_all_single returns correctly shaped buffers, so the exchanged q/k/v/out and the
   full-sequence attention of heads/cp are traced) and the batch each cp rank feeds the model
   (runtime/mesh.py `cp_view`: its s/cp tokens, global position ids, labels shifted over the full
   sequence). Ring attention (torch context_parallel) has no CPU kernel ("CP only supports flash
   attention and memory efficient attention"): refused before anything is built (step.check_traceable);
4. the optimizer step's gradient clipping as runtime/mesh.py `clip_grad_norm` computes it when tp > 1
   (TP-split and replicated gradients are DTensors on different meshes, which torch's clip_grad_norm_
   cannot stack): `clip` calls it.
"""
from __future__ import annotations

from torch import nn

from shardtrain.compiler.specs import ParallelDims


class MeshTraceError(ValueError):
    """The mesh cannot be applied to the traced model (one line)."""


def needs_rank_mesh(parallel: ParallelDims) -> bool:
    """runtime/build.py: the FSDP2 engine gets a RankMesh for tp/cp meshes and HSDP."""
    return not parallel.is_data_parallel_only or parallel.is_hsdp


def shard_like_runtime(model: nn.Module, settings, parallel: ParallelDims, units: list[nn.Module]):
    """TP, FSDP2 and Ulysses exactly as the FSDP2 engine applies them (module doc); returns the
    RankMesh (None for a 1-D mesh, which uses fsdp.json's mesh as the runtime does)."""
    from shardtrain.runtime.fsdp_wrap import shard_model
    from shardtrain.runtime.mesh import RankMesh
    from shardtrain.runtime.tensor_parallel import TensorParallelError
    mesh = RankMesh(parallel, "cpu") if needs_rank_mesh(parallel) else None
    try:
        shard_model(model, settings, "cpu", units, mesh=mesh)
        if parallel.cp > 1:
            from shardtrain.runtime.context_parallel import install_ulysses
            install_ulysses(model, mesh.group("cp"))
    except (TensorParallelError, ValueError) as e:
        raise MeshTraceError(f"--trace: {e}") from None
    return mesh


def cp_inputs(ids, parallel: ParallelDims):
    """(forward kwargs, shifted labels or None) of rank 0 (cp rank 0): runtime/mesh.py cp_view."""
    if parallel.cp == 1:
        return {"input_ids": ids}, None
    from shardtrain.runtime.mesh import coords, cp_view
    batch, shift, _ = cp_view(parallel, coords(parallel, 0, parallel.world), {"input_ids": ids}, ids)
    return batch, shift


def clip(params, parallel: ParallelDims) -> None:
    """The FSDP2 engine's clip (engines.FSDP2Engine.clip): torch's clip_grad_norm_ on a 1-D mesh,
    runtime/mesh.py clip_grad_norm when tp > 1 (gradients on several DTensor meshes)."""
    import torch
    if parallel.tp == 1:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        return
    from shardtrain.runtime.mesh import clip_grad_norm
    clip_grad_norm(list(params), 1.0)