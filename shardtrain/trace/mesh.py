"""The plan's device mesh applied to the traced model: tensor parallel through DTensor and FSDP2 over
the sharding sub-mesh (what `shardtrain plan --trace` runs for a plan with `parallel` beyond one dim).

Order, as torchtitan (torchtitan/models/llama3/infra/parallelize.py: apply_tp, then apply_fsdp) and
accelerate 1.15 (parallelism_config.py `_build_device_mesh`, the dims dp_replicate, dp_shard, cp, tp):
1. `init_device_mesh("cpu", parallel.shape, mesh_dim_names=MESH_DIM_NAMES)` on the fake process group;
2. TP: `parallelize_module(model, mesh["tp"], plan)` with the model's OWN plan: transformers 5.23
   `config.base_model_tp_plan` (Llama: q/k/v/gate/up "colwise", o/down "rowwise"; keys relative to the
   base model, so prefixed with `base_model_prefix`) and the head's `_tp_plan` (Llama: lm_head
   "colwise_gather_output"), each style string translated to torch's ColwiseParallel / RowwiseParallel
   exactly as transformers registers it (transformers/distributed/tensor_parallel.py
   ALL_PARALLEL_STYLES). Llama's plan has no sequence parallel: norms, residuals and the embedding
   stay replicated over tp, the attention/MLP inputs are the full hidden states on every tp rank;
3. FSDP2 `fully_shard` per decoder layer + root over dp_shard × cp (cp ranks shard the weights with
   dp_shard: accelerate's flattened `dp_shard_cp`; just "dp_shard" when cp is 1), or over the 2-D
   (dp_replicate, that) mesh for HSDP (torch's fully_shard: a 2-D mesh = replicate × shard).
   When the sharding group is one rank (e.g. tp 8 alone) fully_shard still runs on it: FSDP2 then
   holds the tp-local params unsharded, as the runtime does.

The transformers Llama attention reshapes q/k/v with `(*input_shape, -1, head_dim)`
(modeling_llama.py LlamaAttention.forward), so colwise-sharded projections give heads/tp local heads
without touching the config.
"""
from __future__ import annotations

from torch import nn

from shardtrain.compiler.specs import MESH_DIM_NAMES, ParallelDims


class MeshTraceError(ValueError):
    """The mesh cannot be applied to the traced model (one line)."""


def _torch_style(name: str):
    """transformers' TP style string -> torch ParallelStyle (transformers/distributed/tensor_parallel.py
    ALL_PARALLEL_STYLES registrations: the same input/output layouts)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    styles = {
        "colwise": lambda: ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1)),
        "colwise_gather_output": lambda: ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "colwise_rep": lambda: ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "rowwise": lambda: RowwiseParallel(input_layouts=Shard(-1), output_layouts=Replicate()),
        "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    }
    if name not in styles:
        raise MeshTraceError(f"--trace: the model's TP plan uses the style {name!r}, which the trace does not "
                             f"translate (known: {', '.join(sorted(styles))}); trace with tp 1")
    return styles[name]()


def model_tp_plan(model: nn.Module) -> dict[str, str]:
    """The model's own TP plan, FQNs from the root: base model plan (config.base_model_tp_plan, keys
    under `base_model_prefix`) + the head's class-level `_tp_plan` (e.g. lm_head)."""
    cfg = model.config
    base = getattr(cfg, "base_model_tp_plan", None) or {}
    if not base:
        raise MeshTraceError(f"--trace: {type(model).__name__} has no base_model_tp_plan in its config "
                             "(transformers defines none for it); trace with tp 1")
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {(f"{prefix}.{k}" if prefix and hasattr(model, prefix) else k): v for k, v in base.items()}
    out.update(getattr(type(model), "_tp_plan", None) or {})
    return out


def check_tp_heads(config, tp: int) -> None:
    """Colwise q/k/v split whole heads only when tp divides the head counts (the planner refuses
    other meshes; this guards plans built by hand)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp or kv % tp:
        raise MeshTraceError(f"--trace: tp {tp} does not divide the attention heads ({heads}) and kv heads ({kv}); "
                             "pick a tp that divides both")


def build_mesh(parallel: ParallelDims, device_type: str = "cpu"):
    """(the full mesh in MESH_DIM_NAMES order, the FSDP mesh). FSDP shards over dp_shard × cp: with
    cp > 1 the two dims are flattened into "dp_shard_cp" (DeviceMesh._flatten, as accelerate and
    torchtitan do; the flattened mesh is kept, not sliced from the root again: torch 2.13 deprecates
    that). HSDP: the 2-D (dp_replicate, shard) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device_type, parallel.shape, mesh_dim_names=MESH_DIM_NAMES)
    if parallel.cp == 1:
        shard = mesh["dp_replicate", "dp_shard"] if parallel.dp_replicate > 1 else mesh["dp_shard"]
    else:
        shard = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        if parallel.dp_replicate > 1:   # HSDP × cp: the one case that slices the flattened dim (torch warns)
            shard = mesh["dp_replicate", "dp_shard_cp"]
    return mesh, shard


def apply_tp(model: nn.Module, mesh, parallel: ParallelDims) -> dict[str, str]:
    """parallelize_module with the model's own plan on mesh["tp"]; returns the plan applied."""
    if parallel.tp == 1:
        return {}
    from torch.distributed.tensor.parallel import parallelize_module
    check_tp_heads(model.config, parallel.tp)
    plan = model_tp_plan(model)
    parallelize_module(model, mesh["tp"], {k: _torch_style(v) for k, v in plan.items()})
    return plan


def shard_model_on_mesh(model: nn.Module, settings, parallel: ParallelDims, units: list[nn.Module],
                        device_type: str = "cpu") -> dict[str, str]:
    """TP (model's plan), Ulysses CP, then fully_shard of every unit and the root over the FSDP sub-mesh,
    with the plan's FsdpSettings for everything but the mesh. Returns the TP plan applied ({} for tp 1)."""
    from torch.distributed.fsdp import fully_shard
    from shardtrain.runtime.fsdp_wrap import mixed_precision_policy, offload_policy
    mesh, shard_mesh = build_mesh(parallel, device_type)
    plan = apply_tp(model, mesh, parallel)
    if parallel.cp > 1:
        install_cp(model, mesh, parallel)
    kwargs = dict(mesh=shard_mesh, mp_policy=mixed_precision_policy(settings),
                  reshard_after_forward=settings.reshard_after_forward)
    if settings.cpu_offload:
        kwargs["offload_policy"] = offload_policy(settings, device_type)
    for layer in units:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return plan


def install_cp(model: nn.Module, mesh, parallel: ParallelDims) -> None:
    """Ulysses: the runtime's own all-to-all attention (runtime/context_parallel.py install_ulysses) on
    the cp sub-mesh's group; the fake backend's all_to_all_single returns correctly shaped buffers, so
    the exchanged q/k/v/out and the full-sequence attention of heads/cp are traced. Ring attention
    (torch context_parallel) has no CPU kernel ("CP only supports flash attention and memory efficient
    attention"): refused before anything is built (step.check_traceable)."""
    from shardtrain.runtime.context_parallel import install_ulysses
    try:
        install_ulysses(model, mesh["cp"].get_group())
    except ValueError as e:
        raise MeshTraceError(f"--trace: {e}") from None


def cp_inputs(ids, parallel: ParallelDims):
    """(forward kwargs, shifted labels or None) of cp rank 0: its s/cp token slice with global
    position ids and the labels shifted over the full sequence (runtime/context_parallel.py cp_slice)."""
    if parallel.cp == 1:
        return {"input_ids": ids}, None
    from shardtrain.runtime.context_parallel import cp_slice
    sl = cp_slice(ids, ids, 0, parallel.cp)
    return {"input_ids": sl["input_ids"], "position_ids": sl["position_ids"]}, sl["shift_labels"]


def clip_grad_norm_on_mesh(params, max_norm: float):
    """clip_grad_norm_ for gradients on different meshes (TP'd linears: DTensors on (dp_shard_cp, tp);
    replicated norms/embedding: on dp_shard_cp only), which torch's clip_grad_norm_ cannot stack
    ("All operands in aten.stack.default must have the same mesh"). As torchtitan
    (torchtitan/distributed/utils.py clip_grad_norm_): the norm per mesh group, made a full tensor,
    then combined; the clip scales every gradient in place (implicit replication of the coefficient)."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for gs in groups.values():
        n = get_total_norm([p.grad for p in gs], 2.0)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    with implicit_replication():
        for gs in groups.values():   # foreach ops refuse operands on different meshes: one call per mesh
            clip_grads_with_norm_(gs, max_norm, total)
    return total
