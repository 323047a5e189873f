"""FSDP2 settings (compiler/facts.py FsdpSettings, plain data) -> the torch objects `fully_shard` takes.

torch/distributed/fsdp/_fully_shard/_fully_shard.py `fully_shard(module, *, mesh, reshard_after_forward,
mp_policy, offload_policy)`; the policies are torch/distributed/fsdp/_fully_shard/_fsdp_api.py
MixedPrecisionPolicy / CPUOffloadPolicy, the mesh torch/distributed/device_mesh.py init_device_mesh.
"""
from __future__ import annotations

import torch
from torch import nn

from shardtrain.compiler.plan import FsdpSettings


def mixed_precision_policy(s: FsdpSettings):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if s.param_dtype == "float32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=getattr(torch, s.param_dtype), reduce_dtype=getattr(torch, s.reduce_dtype),
                                output_dtype=getattr(torch, s.output_dtype) if s.output_dtype else None,
                                cast_forward_inputs=s.cast_forward_inputs)


def offload_policy(s: FsdpSettings, device_type: str):
    """CPUOffloadPolicy when the settings offload; pinned host memory needs an accelerator
    ("Cannot access accelerator device" on CPU-only hosts), so it is pinned on CUDA only."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy
    if not s.cpu_offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=s.offload_pin_memory and device_type == "cuda")


def device_mesh(s: FsdpSettings, device_type: str):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, s.mesh_shape, mesh_dim_names=s.mesh_dim_names)


def shard_model(model: nn.Module, s: FsdpSettings, device_type: str, units: list[nn.Module], mesh=None) -> None:
    """`fully_shard` every unit (the decoder layers) and then the root, with the plan's settings.
    `mesh` (runtime/mesh.py RankMesh, issue 18): tensor parallel first when its tp > 1 (DTensor
    parallelize_module, runtime/tensor_parallel.py), then fully_shard over its dp_shard_cp mesh (HSDP:
    (dp_replicate, dp_shard_cp)), as torchtitan's parallelize_llama orders them; without a mesh, the
    fsdp.json mesh (1-D, or (nodes, gpus_per_node) for HYBRID_SHARD)."""
    from torch.distributed.fsdp import fully_shard
    if mesh is not None and mesh.dims.tp > 1:
        from shardtrain.runtime.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(model, mesh["tp"], units)
    fmesh = mesh.fsdp_mesh() if mesh is not None else device_mesh(s, device_type)
    kwargs = dict(mesh=fmesh, mp_policy=mixed_precision_policy(s),
                  reshard_after_forward=s.reshard_after_forward)
    if s.cpu_offload:
        kwargs["offload_policy"] = offload_policy(s, device_type)
    for layer in units:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
