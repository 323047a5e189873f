"""DeepSpeed AutoTP training (issue 18, DeepSpeed 0.19.8) for the DeepSpeed engine when the emitted
ds_config.json has `tensor_parallel.autotp_size` tp > 1 (emit/deepspeed.py writes the plan's tp there).

How DeepSpeed runs it, and what shardtrain adds:
- `deepspeed.initialize` shards the model itself when the config has autotp_size > 1
  (runtime/engine.py `_configure_tensor_parallel`): `groups._init_tp_mesh_device(tp)` builds a
  (data_parallel = world / tp, tensor_parallel = tp) DeviceMesh, tp innermost, i.e. tp groups of
  consecutive ranks: the tp groups of our mesh (dp_replicate, dp_shard, cp, tp) when cp is 1 (emit refuses
  AutoTP with sequence_parallel_size; ZeRO-3 + tp is not planned). `check_groups` verifies it after
  initialize. The model's own `base_model_tp_plan` (HF) picks the split (engine.py
  `_apply_autotp_partitioning`: custom config > HF tp_plan > AutoTP's heuristics); replicated parameters
  that see split activations get a tp all-reduce hook (auto_tp.py `register_replicated_grad_hooks`).
- ZeRO-1/2 then partition and reduce over DeepSpeed's data-parallel group (dp ranks, `div_(dp)`): a mean
  over dp, which is what the loop's loss scale (grad_reduce = dp × cp = dp) expects: no extra factor.
- data: tp peers must be fed the SAME samples (DeepSpeed checks it on the first forward:
  engine.py `check_dataloader_inputs_same_across_ranks`); build.py's sampler runs per dp rank
  (MeshCoords.dp_rank), and the step's loss / token counts add one rank per tp group (MeshCoords).
- the parameters of a replaced layer are tp-local slices; `safe_get_full_fp32_param` returns the slice's
  fp32 master (and optimizer states). `to_full` / `to_local` convert between that slice and the global
  tensor: runtime/portable.py writes global shapes (so a tp checkpoint resumes on any mesh or engine, and
  any checkpoint on the tp mesh: tests/runtime/test_ds_autotp.py), `full_fp32_params` for checks.
  final/ comes from DeepSpeed's own consolidation (`full_state_dict`, used by checkpoint.full_state_dict).

Process-wide state it leaves: deepspeed.utils.groups' tp/dp groups (`_TENSOR_MODEL_PARALLEL_GROUP`,
`_DATA_PARALLEL_GROUP`, `mpu`), the tp-layer runtime config; `teardown` resets the groups so that a later
engine in the same process (a test's next scenario) builds its own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

TENSOR_PARALLEL, AUTOTP_SIZE = "tensor_parallel", "autotp_size"   # the ds_config keys (emit/deepspeed.py)


def autotp_size(ds_config: dict) -> int:
    """The config's tensor_parallel.autotp_size (1 when absent or 0: AutoTP off)."""
    return int((ds_config.get(TENSOR_PARALLEL) or {}).get(AUTOTP_SIZE, 0) or 1)


def check_config(ds_config: dict, zero_stage: int, sp: int) -> int:
    """tp of the config, refusing what shardtrain does not run with AutoTP (one line each)."""
    tp = autotp_size(ds_config)
    if tp > 1 and sp > 1:
        raise ValueError(f"ds_config.json: tensor_parallel.autotp_size {tp} with sequence_parallel_size {sp}: "
                         "DeepSpeed 0.19.8 does not combine AutoTP with Ulysses; set parallel.tp: 1 or parallel.cp: 1")
    if tp > 1 and zero_stage not in (1, 2):
        raise ValueError(f"ds_config.json: tensor_parallel.autotp_size {tp} with ZeRO stage {zero_stage}: shardtrain "
                         "runs AutoTP on ZeRO-1/2 only; use strategy zero1/zero2, or fsdp_full_shard with parallel.tp")
    return tp


def check_plan(tp: int, full_training: bool, ds_config: dict | None, zero_stage: int) -> None:
    """build.py, before the model is built: a DeepSpeed plan with parallel.tp > 1 that shardtrain's AutoTP
    path runs (one line naming the fix otherwise). The planner only makes ZeRO-1/2 full-training ones
    (compiler/mesh.py); this catches an edited plan.json / ds_config.json."""
    if tp == 1:
        return
    if not full_training:
        raise ValueError(f"plan.json: LoRA/QLoRA with DeepSpeed AutoTP (parallel.tp {tp}) is not run by shardtrain "
                         "(AutoTP replaces the base Linear that peft wraps); use fsdp_full_shard with parallel.tp "
                         "(FSDP2 + DTensor), or parallel.tp: 1")
    got = autotp_size(ds_config or {})
    if got != tp:
        raise ValueError(f"ds_config.json: tensor_parallel.autotp_size {got} but plan.json's parallel.tp is {tp}; "
                         "re-emit the run directory from the plan (shardtrain launch writes both)")
    from shardtrain.runtime.ds_sequence_parallel import sp_size
    check_config(ds_config, zero_stage, sp_size(ds_config))


def tp_group_ranks(rank: int, tp: int) -> list[int]:
    """The mesh's tp group of `rank` (tp innermost: consecutive ranks)."""
    first = rank - rank % tp
    return list(range(first, first + tp))


def check_groups(tp: int) -> None:
    """After deepspeed.initialize: DeepSpeed's tp group is the mesh's (never expected to differ)."""
    from deepspeed.utils import groups
    rank = dist.get_rank()
    got = dist.get_process_group_ranks(groups.get_tensor_model_parallel_group())
    if got != tp_group_ranks(rank, tp):
        raise RuntimeError(f"DeepSpeed's AutoTP group of rank {rank} is {got}, not the mesh's tp group "
                           f"{tp_group_ranks(rank, tp)}")


def check_splits(model: nn.Module, full_shapes: dict, tp: int) -> None:
    """After initialize: every split parameter is tp equal slices of one dim (`split_dim` raises otherwise),
    so checkpoints and final/ can be assembled; checked before the first step, not at the first save."""
    for n, p in model.named_parameters():
        split_dim(n, p.shape, full_shapes[n], tp)


def is_tp_split(p: torch.Tensor) -> bool:
    """Whether AutoTP replaced this parameter's layer with a tp-sharded one (layers.py config_tp_params)."""
    from deepspeed.module_inject.layers import DS_TENSOR_MODEL_PARALLEL
    return bool(getattr(p, DS_TENSOR_MODEL_PARALLEL, False))


def split_probe(model: nn.Module) -> dict:
    """{"split": names of tp-split parameters, "shapes": {name: local shape}} on this rank."""
    return {"split": sorted(n for n, p in model.named_parameters() if is_tp_split(p)),
            "shapes": {n: list(p.shape) for n, p in model.named_parameters()}}


def split_dim(name: str, local_shape, full_shape, tp: int) -> int | None:
    """The dim along which AutoTP cut this parameter into tp equal contiguous slices (None: not cut).
    The HF tp plans AutoTP follows for the models shardtrain plans (Llama-like: separate q/k/v, gate/up
    colwise = dim 0, o/down rowwise = dim 1, lm_head over the vocabulary) cut one dim evenly; anything
    else (fused qkv, uneven head splits) is refused here rather than written in a wrong layout."""
    local_shape, full_shape = tuple(local_shape), tuple(full_shape)
    if local_shape == full_shape:
        return None
    diff = [i for i, (a, b) in enumerate(zip(local_shape, full_shape)) if a != b]
    if len(local_shape) != len(full_shape) or len(diff) != 1 or local_shape[diff[0]] * tp != full_shape[diff[0]]:
        raise RuntimeError(f"AutoTP split {name} {list(full_shape)} into {list(local_shape)} per rank, not {tp} "
                           "equal slices of one dim; shardtrain cannot gather it: use fsdp_full_shard with "
                           "parallel.tp (FSDP2 + DTensor), or parallel.tp: 1")
    return diff[0]


def _tp_group():
    from deepspeed.utils import groups
    return groups.get_tensor_model_parallel_group()


def to_full(name: str, local: torch.Tensor, full_shape, tp: int) -> torch.Tensor:
    """COLLECTIVE over the tp group: the full tensor of a tp-split parameter (or of its optimizer state):
    the slices all-gathered and concatenated along `split_dim`; unchanged when not split."""
    dim = split_dim(name, local.shape, full_shape, tp)
    if dim is None:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=_tp_group())
    return torch.cat(parts, dim=dim)


def to_local(name: str, full: torch.Tensor, local_shape, tp: int) -> torch.Tensor:
    """This rank's AutoTP slice of a full tensor (the inverse of `to_full`; no communication)."""
    dim = split_dim(name, local_shape, full.shape, tp)
    if dim is None:
        return full
    r = dist.get_rank(_tp_group())
    return full.narrow(dim, r * local_shape[dim], local_shape[dim]).contiguous()


def full_fp32_params(eng, full_shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master (ZeRO-gathered, then tp-gathered). A collective over all ranks.
    `full_shapes`: {name: shape} before AutoTP (default: the engine's record, DeepSpeedEngine.full_shapes)."""
    from deepspeed.utils import safe_get_full_fp32_param
    shapes = full_shapes if full_shapes is not None else eng.full_shapes
    tp = getattr(eng, "tp", 1)
    out = {}
    for n, p in eng.model.named_parameters():
        t = safe_get_full_fp32_param(p).detach().clone()
        out[n] = to_full(n, t, shapes[n], tp) if tp > 1 else t
    return out


def full_state_dict(eng) -> dict | None:
    """COLLECTIVE: the full 16-bit/working model state dict on rank 0 (None elsewhere), on the host:
    DeepSpeed's own AutoTP consolidation (engine.py `_replace_module_consolidated_state_dict`: each replaced
    layer gathered over tp in turn, GatherReplacedLayerParams), plus the persistent buffers it leaves out."""
    sd = eng.ds._replace_module_consolidated_state_dict()
    if dist.get_rank() != 0:
        return None
    for n, t in eng.model.state_dict().items():
        sd.setdefault(n, t.detach().cpu())   # buffers (parameters are all in sd already)
    want = eng.full_shapes
    bad = {n: list(t.shape) for n, t in sd.items() if n in want and tuple(t.shape) != tuple(want[n])}
    if bad:  # never expected: a layer DeepSpeed did not gather
        raise RuntimeError(f"AutoTP's consolidated state dict has tp-local shapes for {sorted(bad)[:3]}")
    return sd


def teardown() -> None:
    """Reset deepspeed.utils.groups' tp/dp groups (module doc); safe when AutoTP never ran."""
    from deepspeed.utils import groups
    groups._TENSOR_MODEL_PARALLEL_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups._MODEL_PARALLEL_GROUP = None
    groups.mpu = None
