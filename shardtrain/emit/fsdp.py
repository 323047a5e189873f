"""Plan -> FSDP2 settings (`fsdp.json`), read back by the runtime with `FsdpSettings.from_dict`.

FSDP2 = `torch.distributed.fsdp.fully_shard` (per-parameter DTensor sharding):
- FULL_SHARD: `reshard_after_forward=True` (params re-gathered for backward, ZeRO-3-like).
- SHARD_GRAD_OP: `reshard_after_forward=False` (params stay gathered until backward, ZeRO-2-like).
- HYBRID_SHARD: a 2-D DeviceMesh (replicate across nodes, shard inside a node) passed as `mesh`.
The wrap unit is the model's decoder-layer class, resolved from the real transformers model class
(`PreTrainedModel._no_split_modules`, the unit HF itself never splits), and at wrap time from the
instantiated module tree (`find_layer_class`), never from a hard-coded name list.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import Engine, GradCkpt, Method, Precision, Strategy

_DTYPE = {Precision.BF16: "bfloat16", Precision.FP16: "float16", Precision.FP32: "float32"}
SHARDING = {Strategy.FSDP_FULL_SHARD: "FULL_SHARD", Strategy.FSDP_SHARD_GRAD_OP: "SHARD_GRAD_OP",
            Strategy.FSDP_HYBRID_SHARD: "HYBRID_SHARD"}


@dataclass(frozen=True)
class FsdpSettings:
    """Everything the runtime needs to wrap a model with FSDP2 for one plan."""
    sharding: str
    """FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD (informational; the fields below implement it)."""
    reshard_after_forward: bool
    """fully_shard(reshard_after_forward=...): True frees gathered params after forward."""
    mesh_shape: tuple[int, ...]
    """DeviceMesh shape: (world,) or (nodes, gpus_per_node) for HYBRID_SHARD."""
    mesh_dim_names: tuple[str, ...]
    """("dp_shard",) or ("dp_replicate", "dp_shard")."""
    param_dtype: str
    """MixedPrecisionPolicy.param_dtype (torch dtype name): compute/all-gather dtype."""
    reduce_dtype: str
    """MixedPrecisionPolicy.reduce_dtype: gradient reduce-scatter dtype (fp32 for accuracy)."""
    wrap_class: str
    """Decoder-layer class name: each instance becomes one fully_shard unit (plus the root)."""
    wrap_class_source: str
    """Where wrap_class came from: "transformers:<ModelClass>._no_split_modules" or "model spec"."""
    activation_checkpointing: str
    """none | full | selective (checkpoint every `checkpoint_every`-th wrapped layer)."""
    checkpoint_every: int
    """1 for full, k for selective, 0 for none."""
    defer_grad_sync: bool
    """set_requires_gradient_sync(False) on non-final micro-steps (unsharded fp32 grads held)."""
    world_size: int
    """Data-parallel ranks the plan was made for."""
    output_dtype: str | None = None
    """MixedPrecisionPolicy.output_dtype (None: leave forward outputs in param_dtype)."""
    cast_forward_inputs: bool = True
    """MixedPrecisionPolicy.cast_forward_inputs."""
    cpu_offload: bool = False
    """Use CPUOffloadPolicy (sharded params, grads and optimizer step on the host)."""
    offload_pin_memory: bool = True
    """CPUOffloadPolicy(pin_memory=...); must be False on CPU-only hosts."""
    use_reentrant: bool = False
    """torch.utils.checkpoint use_reentrant: False works with frozen params (LoRA) and FSDP2."""
    state_dict_type: str = "SHARDED_STATE_DICT"
    """Checkpoint format: SHARDED_STATE_DICT (DCP, per rank) or FULL_STATE_DICT."""
    cpu_ram_efficient_loading: bool = True
    """Load weights on rank 0 only (others on meta) and broadcast shards: host RAM ~1x, not Nx."""
    quant_storage_dtype: str | None = None
    """QLoRA: bnb_4bit_quant_storage; must equal param_dtype so 4-bit weights shard with the rest."""
    version: int = 2
    """FSDP API version (2 = fully_shard)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FsdpSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"fsdp settings: unknown keys {unknown}; regenerate with `shardtrain emit`")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if kw.get("version", 2) != 2:
            raise ValueError(f"fsdp settings: version {kw['version']!r} is not supported; only FSDP2 (2)")
        return cls(**kw)

    # ---- torch objects, built lazily (torch is only imported in the runtime)
    def mixed_precision_policy(self):
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy
        if self.param_dtype == "float32":
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=getattr(torch, self.param_dtype),
                                    reduce_dtype=getattr(torch, self.reduce_dtype),
                                    output_dtype=getattr(torch, self.output_dtype) if self.output_dtype else None,
                                    cast_forward_inputs=self.cast_forward_inputs)

    def offload_policy(self):
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy
        return CPUOffloadPolicy(pin_memory=self.offload_pin_memory) if self.cpu_offload else OffloadPolicy()

    def device_mesh(self, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=self.mesh_dim_names)


@functools.lru_cache(maxsize=None)
def transformers_layer_class(model_type: str) -> tuple[str, str] | None:
    """(decoder-layer class name, source) from the transformers model class registered for
    `model_type`, or None when transformers does not know the model type."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return None
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if name else None
    units = list(getattr(cls, "_no_split_modules", None) or [])
    if not units:
        return None
    return units[0], f"transformers:{name}._no_split_modules"


def find_layer_class(model, name: str | None = None) -> type:
    """The decoder-layer class inside an instantiated model: the class called `name` if present,
    else the class shared by all children of the longest ModuleList (the layer stack).
    Raises ValueError naming the classes that were found."""
    from torch import nn
    found = {type(m).__name__: type(m) for m in model.modules()}
    if name and name in found:
        return found[name]
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
              and len({type(c) for c in m}) == 1]
    if stacks:
        cls = type(next(iter(max(stacks, key=len))))
        if name is None:
            return cls
        raise ValueError(f"fsdp wrap class: {name!r} is not in the model; its layer stack is made of "
                         f"{cls.__name__!r}: regenerate fsdp.json (`shardtrain emit`) for this model")
    raise ValueError(f"fsdp wrap class: {name!r} not found and the model has no uniform layer stack; "
                     f"classes present: {sorted(found)[:20]}")


def fsdp_settings(plan: Plan) -> FsdpSettings:
    """FSDP2 settings for an FSDP plan (raises ValueError for other engines)."""
    c, s = plan.chosen, plan.chosen.strategy
    if s.engine is not Engine.FSDP:
        raise ValueError(f"strategy: {s.value!r} is not an FSDP strategy; use the DeepSpeed/DDP outputs or "
                         "force fsdp_full_shard / fsdp_shard_grad_op / fsdp_hybrid_shard")
    hw = plan.hardware
    if s is Strategy.FSDP_HYBRID_SHARD:
        mesh, names = (hw.nodes, hw.gpus_per_node), ("dp_replicate", "dp_shard")
    else:
        mesh, names = (c.world_size,), ("dp_shard",)
    resolved = transformers_layer_class(plan.model.model_type)
    wrap, source = resolved if resolved else (plan.model.decoder_layer_class, "model spec")
    ck = c.gradient_checkpointing
    every = {GradCkpt.FULL: 1, GradCkpt.SELECTIVE: plan.train.selective_every}.get(ck, 0)
    dtype = _DTYPE[c.precision]
    return FsdpSettings(
        sharding=SHARDING[s], reshard_after_forward=s is not Strategy.FSDP_SHARD_GRAD_OP, mesh_shape=mesh,
        mesh_dim_names=names, param_dtype=dtype, reduce_dtype="float32", wrap_class=wrap,
        wrap_class_source=source, activation_checkpointing=ck.value if every else "none",
        checkpoint_every=every, defer_grad_sync=c.fsdp_defer_grad_sync, world_size=c.world_size,
        quant_storage_dtype=dtype if c.method is Method.QLORA else None)
