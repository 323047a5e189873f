"""`shardtrain check` for the device mesh (issue 18): the DeepSpeed keys sequence_parallel_size and
tensor_parallel.autotp_size, and accelerate.yaml's parallelism_config block.

Each finding names the key, the value and the fix. What the installed tools refuse is asked of them:
accelerate's own ParallelismConfig is built from the YAML block (its __post_init__ validation, then the
total_size == num_processes and "FSDP needs a dim to shard over" rules of its _validate_accelerator, which
needs a live Accelerator and is restated here from accelerate 1.15 parallelism_config.py); DeepSpeed's
parser runs in emit/check.py (engine_schema). The rules DeepSpeed's parser does not see come from the
issue's legality list: AutoTP trains with ZeRO-1/2 only (the planner's rule), not together with Ulysses,
tp divides heads and kv heads, Ulysses sp divides heads, the mesh multiplies out to the world size.
"""
from __future__ import annotations

from shardtrain.emit import deepspeed as K
from shardtrain.emit import engine_schema as S
from shardtrain.emit.accelerate import PARALLELISM_KEY_PREFIX
from shardtrain.emit.check import ERROR, WARNING, Finding

PARALLELISM_BLOCK = "parallelism_config"
_SIZE_KEYS = ("dp_replicate_size", "dp_shard_size", "tp_size", "cp_size", "sp_size")


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def heads_findings(key: str, size: int, what: str, heads: tuple[int, int] | None, *, kv: bool = True) -> list[Finding]:
    """`size` must divide the attention heads (and, for tp, the kv heads: each tp rank holds whole kv heads)."""
    if heads is None or size <= 1:
        return []
    n, n_kv = heads
    out = []
    if n % size:
        out.append(Finding(ERROR, key, f"{size} does not divide the model's {n} attention heads ({what} gives "
                           "each rank whole heads)", f"use a divisor of {n}, e.g. {_divisor_below(n, size)}"))
    elif kv and n_kv % size:
        out.append(Finding(ERROR, key, f"{size} does not divide the model's {n_kv} key/value heads ({what} gives "
                           "each rank whole kv heads)", f"use a divisor of {n_kv}, e.g. {_divisor_below(n_kv, size)}"))
    return out


def _divisor_below(n: int, size: int) -> int:
    return max(d for d in range(1, min(n, size) + 1) if n % d == 0)


def deepspeed_mesh(cfg: dict, world: int | None, stage: int, heads: tuple[int, int] | None = None) -> list[Finding]:
    """sequence_parallel_size (Ulysses) and tensor_parallel.autotp_size against the stage, each other, the
    world size and the model's heads."""
    sizes = K.mesh_sizes(cfg)
    sp_raw, tp_raw = sizes[K.SEQUENCE_PARALLEL_SIZE], sizes[K.AUTOTP_SIZE]
    out: list[Finding] = []
    sp, tp = _int(sp_raw), _int(tp_raw)
    tp_key = f"{K.TENSOR_PARALLEL}.{K.AUTOTP_SIZE}"
    if sp_raw is not None and (sp is None or sp < 1):
        out.append(Finding(ERROR, K.SEQUENCE_PARALLEL_SIZE, f"{sp_raw!r} must be an integer >= 1 (DeepSpeed divides "
                           "the world size by it)", "write the plan's cp, e.g. 2, or delete it"))
        sp = None
    if tp is not None and tp < 0:
        tp = None  # DeepSpeed's TPTrainingConfig takes any int; a negative one is judged by its parser's run
    sp, tp = sp or 1, tp or 1
    if tp > 1 and stage not in (1, 2):
        out.append(Finding(ERROR, tp_key, f"{tp} with ZeRO stage {stage}: AutoTP trains with ZeRO-1/2 only "
                           "(shardtrain's legality rule; ZeRO-3 shards the parameters AutoTP splits)",
                           f"set {K.ZERO}.{K.STAGE}: 1 or 2, or use an fsdp_* strategy for tp with sharded parameters"))
    if tp > 1 and sp > 1:
        out.append(Finding(ERROR, K.SEQUENCE_PARALLEL_SIZE, f"{sp} with {tp_key} {tp}: DeepSpeed cannot combine "
                           "Ulysses with AutoTP (ALST's process groups have no tp dim)",
                           f"delete one of them, or use an fsdp_* strategy for tp × cp"))
    if world is not None and world % (sp * tp):
        out.append(Finding(ERROR, K.SEQUENCE_PARALLEL_SIZE if sp > 1 else tp_key,
                           f"the mesh does not multiply out: world size {world} is not a multiple of "
                           f"sequence_parallel_size {sp} × autotp_size {tp}",
                           f"use sizes whose product divides {world}"))
    out += heads_findings(K.SEQUENCE_PARALLEL_SIZE, sp, "Ulysses", heads, kv=False)
    out += heads_findings(tp_key, tp, "AutoTP", heads)
    return out


def accelerate_mesh(cfg: dict, heads: tuple[int, int] | None = None) -> list[Finding]:
    """accelerate.yaml's parallelism_config block, judged by accelerate's own ParallelismConfig."""
    block = cfg.get(PARALLELISM_BLOCK)
    if not block:
        return []
    if not isinstance(block, dict):
        return [Finding(ERROR, PARALLELISM_BLOCK, f"{block!r} is not a mapping", "write parallelism_config_* keys")]
    dt, n = cfg.get("distributed_type"), _int(cfg.get("num_processes"))
    if dt not in ("FSDP", None):
        return [Finding(WARNING, PARALLELISM_BLOCK, f"accelerate 1.15 exports it only for FSDP (version 2) launches, "
                        f"not {dt} (commands/launch.py: prepare_multi_gpu_env); it is silently ignored",
                        "DeepSpeed: pass Accelerator(parallelism_config=ParallelismConfig(sp_size=..., "
                        "sp_backend='deepspeed')) in the script (Ulysses), AutoTP via tensor_parallel.autotp_size "
                        "in the DeepSpeed JSON; delete the block")]
    kw = {k.removeprefix(PARALLELISM_KEY_PREFIX): v for k, v in block.items()}
    sizes = {k: kw[k] for k in _SIZE_KEYS if k in kw}
    args = {**{k: 1 for k in _SIZE_KEYS}, **sizes}
    bad = {k: v for k, v in args.items() if _int(v) is None}
    if bad:
        k, v = next(iter(bad.items()))
        return [Finding(ERROR, f"{PARALLELISM_BLOCK}.{PARALLELISM_KEY_PREFIX}{k}", f"{v!r} is not an integer",
                        "write a size >= 1")]
    for k in ("cp_backend", "sp_backend"):
        if k in kw:
            args[k] = kw[k]
    try:
        pc = S.accelerate_parallelism_config(args)
    except ImportError:
        return [Finding(WARNING, PARALLELISM_BLOCK, "accelerate is not installed here, so the mesh was not checked",
                        "run `shardtrain check` where accelerate is installed")]
    except (ValueError, TypeError) as e:
        return [Finding(ERROR, PARALLELISM_BLOCK, f"accelerate's ParallelismConfig refuses it: "
                        f"{' '.join(str(e).split())}", "fix the sizes it names (shardtrain emit writes a legal mesh)")]
    out = []
    if n is not None and pc.total_size != n and not (pc.sp_backend == "deepspeed" and pc.sp_size > 1):
        out.append(Finding(ERROR, PARALLELISM_BLOCK, f"the mesh does not multiply out: dp_replicate {pc.dp_replicate_size}"
                           f" × dp_shard {pc.dp_shard_size} × tp {pc.tp_size} × cp {pc.cp_size} × sp {pc.sp_size} = "
                           f"{pc.total_size}, but num_processes is {n} (accelerate raises 'ParallelismConfig "
                           "total_size ... does not match num_processes')",
                           f"make the sizes multiply to {n}, or num_processes: {pc.total_size}"))
    if dt == "FSDP" and not pc.dp_shard_enabled and not pc.cp_enabled and pc.total_size > 1:
        out.append(Finding(ERROR, PARALLELISM_BLOCK, "FSDP has no dim to shard over (dp_shard_size and cp_size are "
                           "1; accelerate raises)", "set parallelism_config_dp_shard_size > 1"))
    out += heads_findings(f"{PARALLELISM_BLOCK}.{PARALLELISM_KEY_PREFIX}tp_size", pc.tp_size, "tensor parallel", heads)
    return out
