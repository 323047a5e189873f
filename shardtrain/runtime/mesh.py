"""The device mesh one rank trains on (issue 18): plan.parallel (compiler/specs.py ParallelDims) -> this
rank's coordinates, its torch DeviceMesh and the sub-meshes each consumer uses.

Mesh order (dp_replicate, dp_shard, cp, tp), tp innermost (MESH_DIM_NAMES), row-major: rank
r = ((rep * dp_shard + shard) * cp + c) * tp + t, as torch's init_device_mesh lays out ranks.
Flattened sub-meshes (torch 2.13 DeviceMesh._flatten, as accelerate 1.15 parallelism_config.py
`_build_device_mesh` and torchtitan's ParallelDims do):
  "dp"          (dp_replicate, dp_shard)       ranks taking different samples
  "dp_shard_cp" (dp_shard, cp)                 what FSDP2 shards the (tp-local) model state over
  "dp_cp"       (dp_replicate, dp_shard, cp)   ranks a gradient is averaged over
FSDP2 gets the 1-D "dp_shard_cp" mesh, or the 2-D (dp_replicate, dp_shard_cp) mesh for HSDP
(fully_shard replicates over dim 0 and shards over dim 1: torch/distributed/fsdp/_fully_shard/
_fsdp_init.py, HSDPMeshInfo(mesh, shard_mesh_dim=1, replicate_mesh_dim=0)); tp 2 × dp_replicate 2
runs as HSDP with a shard dim of size 1 (measured: it runs and matches the 1-D run,
tests/runtime/test_mesh_runs.py). The sampler and the loop need no group: the sampler takes the dp rank
from MeshCoords, and the step's loss sum / token counts stay ONE all-reduce over the world in which one
rank per sequence adds its share (MeshCoords.counts_loss / counts_tokens), as on the 1-D mesh.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from shardtrain.compiler.specs import MESH_DIM_NAMES, ParallelDims

DP, DP_SHARD_CP, DP_CP = "dp", "dp_shard_cp", "dp_cp"


@dataclass(frozen=True)
class MeshCoords:
    """Where one rank sits in the mesh (pure arithmetic: no process group needed)."""
    dims: ParallelDims
    rank: int

    def _coord(self, name: str) -> int:
        r = self.rank
        for k in reversed(MESH_DIM_NAMES):  # innermost first
            size = getattr(self.dims, k)
            if k == name:
                return r % size
            r //= size
        raise KeyError(name)

    @property
    def tp_rank(self) -> int:
        return self._coord("tp")

    @property
    def cp_rank(self) -> int:
        return self._coord("cp")

    @property
    def dp_rank(self) -> int:
        """Index among the ranks that take different samples (the sampler's rank)."""
        return self._coord("dp_replicate") * self.dims.dp_shard + self._coord("dp_shard")

    @property
    def counts_loss(self) -> bool:
        """One rank of each tp group adds its loss sum to the step's total: tp peers compute the same
        loss of the same tokens, so summing over the world would count it tp times."""
        return self.tp_rank == 0

    @property
    def counts_tokens(self) -> bool:
        """One rank per sequence (tp 0, cp 0) adds its label count: tp and cp peers share the sequence."""
        return self.tp_rank == 0 and self.cp_rank == 0


def coords(dims: ParallelDims, rank: int, world_size: int) -> MeshCoords:
    if dims.world != world_size:
        raise RuntimeError(f"plan.json's mesh {dims.label()} has {dims.world} ranks but {world_size} are running; "
                           "re-plan for this world size (`shardtrain launch` recompiles the plan)")
    return MeshCoords(dims, rank)


class RankMesh:
    """The torch DeviceMesh of a plan (built once per run, a collective) and its named sub-meshes."""

    def __init__(self, dims: ParallelDims, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh
        self.dims = dims
        self.mesh = init_device_mesh(device_type, dims.shape, mesh_dim_names=MESH_DIM_NAMES)
        # kept as returned: torch 2.13 warns that slicing a flattened dim from the root is deprecated
        self.flat = {DP: self.mesh["dp_replicate", "dp_shard"]._flatten(DP),
                     DP_SHARD_CP: self.mesh["dp_shard", "cp"]._flatten(DP_SHARD_CP),
                     DP_CP: self.mesh["dp_replicate", "dp_shard", "cp"]._flatten(DP_CP)}

    def __getitem__(self, name: str):
        return self.flat[name] if name in self.flat else self.mesh[name]

    def fsdp_mesh(self):
        """HSDP: 2-D (dp_replicate, dp_shard_cp) (DeviceMesh._concatenate of the two, as torch 2.13's
        deprecation of slicing flattened dims asks); otherwise 1-D dp_shard_cp."""
        if self.dims.dp_replicate > 1:
            from torch.distributed.device_mesh import DeviceMesh
            return DeviceMesh._concatenate([self.mesh["dp_replicate"], self.flat[DP_SHARD_CP]])
        return self.flat[DP_SHARD_CP]

    def group(self, name: str):
        return self.mesh[name].get_group()


def cp_view(dims: ParallelDims, mc: MeshCoords, batch: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor, bool]:
    """(batch, labels, shifted) this rank feeds the model. cp > 1: its token slice with global
    position ids and labels shifted over the FULL sequence before slicing (context_parallel.cp_slice);
    the padding mask is dropped (right padding under a causal kernel changes no labelled token's
    result; Ulysses attends over the full sequence without a local mask). cp 1: unchanged."""
    if dims.cp == 1:
        return batch, labels, False
    from shardtrain.runtime.context_parallel import cp_slice
    d = cp_slice(batch["input_ids"], labels, mc.cp_rank, dims.cp, position_ids=batch.get("position_ids"))
    shift = d.pop("shift_labels")
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "position_ids", "attention_mask")}
    return {**rest, **d}, shift, True


class SliceCP:
    """The worker's sequence split without ring attention: cp_view (Ulysses cp: this rank's token slice;
    cp 1: the batch unchanged) and no context around the micro-step. ring_attention.RingCP is the ring
    counterpart (view = the full shifted sequences, shard = torch's context_parallel)."""

    def __init__(self, dims: ParallelDims, mc: MeshCoords):
        self.dims, self.mc = dims, mc

    def view(self, batch: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor, bool]:
        return cp_view(self.dims, self.mc, batch, labels)

    def shard(self, batch: dict, labels: torch.Tensor):
        return contextlib.nullcontext()


# ------------------------------------------------------------------------------ gradient clipping
def _mesh_key(t: torch.Tensor):
    """The DTensor's DeviceMesh (hashable by its layout and names: no tensor op, so FakeTensorMode-safe),
    None for a plain tensor."""
    return getattr(t, "device_mesh", None)


def _replicas(t: torch.Tensor, world: int) -> int:
    """How many ranks hold this (local) gradient: the ranks outside its DTensor mesh, times its mesh's
    Replicate dims (an FSDP-only gradient is replicated over tp; a plain tensor on every rank)."""
    mesh = getattr(t, "device_mesh", None)
    if mesh is None:
        return world
    n = world // mesh.size()
    for i, pl in enumerate(t.placements):
        if pl.is_replicate():
            n *= mesh.size(i)
    return n


@torch.no_grad()
def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for gradients that are DTensors on DIFFERENT meshes (FSDP2 + TP:
    TP-sharded weights live on (dp_shard_cp, tp), the replicated norms/embedding on dp_shard_cp only;
    torch's version stacks their norms into one op and fails: "All operands in aten.stack.default must
    have the same mesh"). The squared norm is ONE all-reduce over the world of each rank's local
    squared sums, each divided by the number of ranks holding the same values (a power of two for
    power-of-two meshes: exact), so every rank gets the same total bit for bit (DTensor's own
    full_tensor() of a norm partial over two dims does two all-reduces in turn, which torch warns "may
    give inconsistent results between ranks"; replicas clipped by different factors would drift).
    Clipped per mesh group with that total (clip_grads_with_norm_ multiplies each group in one op).
    Returns the total norm."""
    import torch.distributed as dist
    groups: dict = defaultdict(list)
    for p in params:
        if p.grad is not None:
            groups[_mesh_key(p.grad)].append(p)
    world = dist.get_world_size() if dist.is_initialized() else 1
    sq = []
    for ps in groups.values():
        for p in ps:
            g = p.grad
            local = g.to_local() if hasattr(g, "to_local") else g
            # the norm in one reduction kernel (no gradient-sized temporary: `local.double().pow(2)` made
            # an fp64 copy of each gradient, 2x the largest one at the step's peak, which the plan does not
            # count; `plan --trace` on tp 2 x dp_replicate 2 showed it), squared in fp64
            sq.append(torch.linalg.vector_norm(local, 2).double().pow(2) / _replicas(g, world))
    if not sq:
        return torch.zeros(())
    total_sq = torch.stack(sq).sum()
    if world > 1:
        dist.all_reduce(total_sq)
    total = total_sq.sqrt().float()
    if max_norm > 0 and math.isfinite(max_norm):
        for ps in groups.values():
            torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total)
    return total
