"""Plan -> FSDP2 settings (`fsdp.json`; the dataclass is compiler/facts.py FsdpSettings, carried in
plan.json's runtime facts). Pure data: the torch objects (MixedPrecisionPolicy, CPUOffloadPolicy,
DeviceMesh) are built from it in the runtime (shardtrain/runtime/fsdp_wrap.py).

FSDP2 = `torch.distributed.fsdp.fully_shard` (per-parameter DTensor sharding):
- FULL_SHARD: `reshard_after_forward=True` (params re-gathered for backward, ZeRO-3-like).
- SHARD_GRAD_OP: `reshard_after_forward=False` (params stay gathered until backward, ZeRO-2-like).
- fsdp_offload: FULL_SHARD + `CPUOffloadPolicy` (cpu_offload: sharded params, grads and the optimizer
  step on the host; accelerate `fsdp_offload_params: true`, Trainer fsdp_config `cpu_offload`).
- HYBRID_SHARD (HSDP): whenever the plan's mesh has dp_replicate > 1 — a 2-D DeviceMesh
  (dp_replicate, dp_shard × cp) passed as `mesh`. The old strategy name fsdp_hybrid_shard is one case
  of it (ParallelDims.for_strategy: dp_replicate = nodes, dp_shard = GPUs per node) and reshards like
  FULL_SHARD; nothing here reads the strategy to decide HSDP.
mesh_shape / mesh_dim_names are the data-parallel mesh `fully_shard` shards over (tp and cp ranks are not
in it: the runtime builds the whole device mesh from plan.parallel and takes this sub-mesh of it;
cp ranks shard the model state with dp_shard, as accelerate's/torchtitan's flattened dp_shard_cp does).
The wrap unit is the model's decoder-layer class, resolved from the real transformers model class
(`PreTrainedModel._no_split_modules`, the unit HF itself never splits), never from a hard-coded name
list; at wrap time the runtime refuses a wrap class that matches no module (runtime/engines.py).
"""
from __future__ import annotations

import ast
import functools
import math
import importlib.util
from pathlib import Path

from shardtrain.compiler.plan import FsdpSettings, Plan
from shardtrain.compiler.specs import Engine, GradCkpt, Method, Precision, Strategy

DTYPE_NAME = {Precision.BF16: "bfloat16", Precision.FP16: "float16", Precision.FP32: "float32",
              Precision.BF16_PURE: "bfloat16"}
"""Precision -> the torch dtype name of its compute dtype, as the HF configs spell it (FSDP policy, bnb)."""
SHARDING = {Strategy.FSDP_FULL_SHARD: "FULL_SHARD", Strategy.FSDP_SHARD_GRAD_OP: "SHARD_GRAD_OP",
            Strategy.FSDP_HYBRID_SHARD: "FULL_SHARD", Strategy.FSDP_OFFLOAD: "FULL_SHARD"}
"""The name within one replica; HYBRID_SHARD whenever the mesh has a replicate dim (fsdp_mesh)."""


@functools.lru_cache(maxsize=None)
def transformers_layer_class(model_type: str) -> tuple[str, str] | None:
    """(decoder-layer class name, source) from the transformers model class registered for
    `model_type`, or None when transformers (or the model type) is not known here.

    Read from the INSTALLED transformers' source, not imported (importing a model class imports torch;
    emit stays torch-free): models/auto/modeling_auto.py MODEL_FOR_CAUSAL_LM_MAPPING_NAMES names the
    class, and its `_no_split_modules` (on the class or a base class of its modeling file) names the unit
    (tests/test_emit_fsdp.py checks this against the imported classes)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    mapping = _assigned_literal(_parse(models / "auto" / "modeling_auto.py"), "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    name = dict(mapping or ()).get(model_type)
    if not name:
        return None
    folder = model_type.replace("-", "_")
    files = [models / folder / f"modeling_{folder}.py"]
    files += [f for f in sorted(models.glob(f"*/modeling_{folder}*.py")) if f not in files]
    for f in files + sorted(models.glob("*/modeling_*.py")):
        tree = _parse(f)
        classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)} if tree else {}
        if name in classes:
            units = _no_split_modules(classes, name)
            return (units[0], f"transformers:{name}._no_split_modules") if units else None
    return None


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _assigned_literal(tree: ast.Module | None, target: str):
    """The literal value assigned to a module-level name (an OrderedDict([...]) call: its argument)."""
    for node in tree.body if tree else ():
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            names = [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                     if isinstance(t, ast.Name)]
            if target in names:
                value = node.value.args[0] if isinstance(node.value, ast.Call) and node.value.args else node.value
                try:
                    return ast.literal_eval(value)
                except ValueError:
                    return None
    return None


def _no_split_modules(classes: dict[str, ast.ClassDef], name: str) -> list[str]:
    """`_no_split_modules` of class `name`, else of its bases defined in the same file (Python's MRO order)."""
    seen, todo = set(), [name]
    while todo:
        cls = classes.get(todo.pop(0))
        if cls is None or cls.name in seen:
            continue
        seen.add(cls.name)
        found = _assigned_literal(ast.Module(body=cls.body, type_ignores=[]), "_no_split_modules")
        if found:
            return list(found)
        todo += [b.id for b in cls.bases if isinstance(b, ast.Name)]
    return []


def fsdp_mesh(plan: Plan) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(shape, dim names) of the mesh fully_shard gets: (dp_replicate, dp_shard × cp) for HSDP
    (dp_replicate > 1), else (dp_shard × cp,). "dp_shard" names the sharded dim as before the mesh
    existed (with cp > 1 it is accelerate's dp_shard_cp); its product is the gradient-reduce group."""
    p = plan.parallel
    if p.dp_replicate > 1:
        return (p.dp_replicate, p.fsdp_shard), ("dp_replicate", "dp_shard")
    return (p.fsdp_shard,), ("dp_shard",)


def hf_checkpoint_every(plan: Plan) -> int:
    """Every how many decoder layers the HF runners (accelerate, the Trainer) checkpoint a whole layer for
    this plan: 0 none, 1 every layer, k every k-th (selective). op (torchtitan's op-level SAC) exists only
    in shardtrain's runtime (it reads plan.chosen, not these settings): every layer instead (less memory,
    more recompute)."""
    ck = plan.chosen.gradient_checkpointing
    return {GradCkpt.FULL: 1, GradCkpt.OP: 1, GradCkpt.SELECTIVE: plan.train.selective_every}.get(ck, 0)


def fsdp_settings(plan: Plan) -> FsdpSettings:
    """FSDP2 settings for an FSDP plan (raises ValueError for other engines)."""
    c, s = plan.chosen, plan.chosen.strategy
    if s.engine is not Engine.FSDP:
        raise ValueError(f"strategy: {s.value!r} is not an FSDP strategy; use the DeepSpeed/DDP outputs or "
                         "force fsdp_full_shard / fsdp_shard_grad_op / fsdp_hybrid_shard")
    mesh, names = fsdp_mesh(plan)
    resolved = transformers_layer_class(plan.model.model_type)
    wrap, source = resolved if resolved else (plan.model.decoder_layer_class, "model spec")
    ck = c.gradient_checkpointing
    every = hf_checkpoint_every(plan)
    dtype = DTYPE_NAME[c.precision]
    return FsdpSettings(
        sharding="HYBRID_SHARD" if len(mesh) == 2 else SHARDING[s],
        reshard_after_forward=s is not Strategy.FSDP_SHARD_GRAD_OP, mesh_shape=mesh,
        # pure bf16: the params are bf16 already, so param_dtype = reduce_dtype = bfloat16 is no policy at all
        # (_fsdp_param.py init_dtype_attrs: a dtype equal to the param's is None): bf16 all-gather and reduce
        mesh_dim_names=names, param_dtype=dtype,
        reduce_dtype="bfloat16" if c.precision is Precision.BF16_PURE else "float32", wrap_class=wrap,
        wrap_class_source=source,
        activation_checkpointing=("full" if ck is GradCkpt.OP else ck.value) if every else "none",
        checkpoint_every=every, defer_grad_sync=c.fsdp_defer_grad_sync, world_size=math.prod(mesh),
        quant_storage_dtype=dtype if c.method is Method.QLORA else None,
        # fsdp_offload: CPUOffloadPolicy(pin_memory=True) (the runtime pins on CUDA only: fsdp_wrap.py)
        cpu_offload=s is Strategy.FSDP_OFFLOAD)
