"""Which device meshes a plan may use: enumeration and legality (pure; no torch).

The planner (compiler/planner.py) evaluates every legal mesh with every strategy, checkpointing, micro
batch and loss path and keeps the fastest that fits. A mesh is dp_replicate × dp_shard × cp × tp = the
world size (compiler/specs.py ParallelDims). What each engine runs, and so what is legal:

- DDP replicates whole models: dp_replicate = world, no tp, no cp.
- FSDP2 (torch 2.13): tp/sp through DTensor ``parallelize_module``, ``fully_shard`` over dp_shard × cp,
  HSDP through a replicate dim (dp_replicate), cp as Ulysses (our all-to-all around the model's
  attention, runtime/context_parallel.py) or ring (torch ``context_parallel``, CUDA SDPA kernels only).
- DeepSpeed (0.19.8): ZeRO shards over every data-parallel rank (no replicate dim); AutoTP
  (``tensor_parallel.autotp_size``) runs with ZeRO-0/1/2 only (DeepSpeed's AutoTP training tutorial,
  deepspeed/runtime/engine.py asserts zero stage < 3 with autotp); Ulysses sequence parallel
  (``sequence_parallel_size``, ALST) with any ZeRO stage; no ring attention.
"""
from __future__ import annotations

from collections.abc import Iterator

from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.specs import (Attention, CpMode, Engine, HardwareSpec, Method, ParallelDims,
                                       ParallelRequest, Strategy, TrainSpec)

#: Largest tp / cp the automatic search tries (forced values may go beyond): tp past one node's NVLink
#: domain and cp past 32 ranks are not what published recipes run (torchtitan's Llama 3 405B recipe: tp 8
#: within a node; ALST: sp up to 32 over 4 nodes).
MAX_AUTO_TP = 8
MAX_AUTO_CP = 32


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pow2_upto(n: int) -> list[int]:
    out, d = [], 1
    while d <= n:
        out.append(d)
        d *= 2
    return out


def tp_options(model: ModelSpec, hw: HardwareSpec, req: ParallelRequest) -> list[int]:
    if req.tp is not None:
        return [req.tp]
    return [d for d in _pow2_upto(min(MAX_AUTO_TP, hw.gpus_per_node)) if hw.gpus_per_node % d == 0
            and model.num_heads % d == 0 and model.num_kv_heads % d == 0]


def cp_options(hw: HardwareSpec, train: TrainSpec, tp: int) -> list[int]:
    req = train.parallel
    if req.cp is not None:
        return [req.cp]
    rest = hw.world_size // tp
    return [d for d in _pow2_upto(min(MAX_AUTO_CP, rest)) if rest % d == 0 and train.seq_len % d == 0]


def cp_modes(req: ParallelRequest, cp: int) -> list[CpMode]:
    """cp_mode auto = Ulysses: shardtrain's runtime runs it on every engine and device
    (runtime/context_parallel.py, ALST on DeepSpeed), tested against the 1-D run on CPU. Ring is planned
    only when asked for (parallel.cp_mode: ring): it runs on CUDA only (runtime/ring_attention.py on
    FSDP2; accelerate's parallelism_config in the user's own script) and has not been run on a GPU by
    this project yet; CPU launches refuse it in one line (launcher/preflight.py)."""
    if cp == 1:
        return [CpMode.ULYSSES]
    return [req.cp_mode] if req.cp_mode is not None else [CpMode.ULYSSES]


def replicate_options(strategy: Strategy, hw: HardwareSpec, req: ParallelRequest, rest: int) -> list[int]:
    """dp_replicate values for ``rest`` = world / (tp × cp) data-parallel ranks."""
    if req.dp_replicate is not None:
        return [req.dp_replicate]
    if req.dp_shard is not None:
        return [rest // req.dp_shard] if req.dp_shard and rest % req.dp_shard == 0 else []
    if strategy is Strategy.DDP:
        return [rest]
    if strategy.engine is Engine.FSDP and hw.nodes > 1:
        # HSDP: one sharded copy per node (reduce-scatter on NVLink, one all-reduce across nodes)
        per_node = rest // hw.nodes if rest % hw.nodes == 0 else 0
        return [1] + ([hw.nodes] if per_node >= 1 else [])
    return [1]


def meshes(model: ModelSpec, hw: HardwareSpec, train: TrainSpec, strategy: Strategy) -> Iterator[ParallelDims]:
    """Every mesh of hw.world_size ranks the request admits for ``strategy`` (legal or not: the planner
    asks mesh_illegal_reason and reports why a forced one cannot run)."""
    req, world = train.parallel, hw.world_size
    for tp in tp_options(model, hw, req):
        if world % tp:
            continue
        for cp in cp_options(hw, train, tp):
            if (world // tp) % cp:
                continue
            rest = world // (tp * cp)
            for rep in replicate_options(strategy, hw, req, rest):
                if rep < 1 or rest % rep:
                    continue
                for mode in cp_modes(req, cp):
                    p = ParallelDims(dp_replicate=rep, dp_shard=rest // rep, cp=cp, tp=tp, cp_mode=mode)
                    if req.admits(p):
                        yield p


def mesh_illegal_reason(strategy: Strategy, p: ParallelDims, model: ModelSpec, hw: HardwareSpec,
                        train: TrainSpec, method: Method) -> str | None:
    """Why ``strategy`` cannot run on mesh ``p`` (one line with the fix), or None."""
    if p.world != hw.world_size:
        return (f"parallel: dp_replicate {p.dp_replicate} × dp_shard {p.dp_shard} × cp {p.cp} × tp {p.tp} = "
                f"{p.world}, not the {hw.world_size} GPUs (nodes × gpus_per_node); make the product match or "
                "leave one dim auto")
    eng = strategy.engine
    if eng is Engine.DDP and not p.is_data_parallel_only:
        return "ddp replicates the whole model: tp and cp need an fsdp or zero strategy"
    if eng is Engine.DDP and p.dp_shard > 1:
        return "ddp has no sharded dim: set parallel.dp_shard 1 or use fsdp_full_shard (HSDP)"
    if strategy is Strategy.FSDP_OFFLOAD and (p.tp > 1 or p.cp > 1 or p.dp_replicate > 1):
        # CPUOffloadPolicy is run and tested here on the 1-D dp_shard mesh only (runtime/fsdp_wrap.py)
        return (f"fsdp_offload runs on a 1-D mesh here, not {p.label()}: set parallel.tp/cp/dp_replicate 1, or "
                "use fsdp_full_shard for tp / cp / HSDP")
    if eng is Engine.DEEPSPEED and p.dp_replicate > 1:
        return (f"{strategy.value}: ZeRO shards over every data-parallel rank (no replicate dim); use "
                "fsdp_full_shard for HSDP or set parallel.dp_replicate 1")
    if p.tp > 1:
        r = _tp_reason(strategy, p, model, hw, train, method)
        if r:
            return r
    if p.cp > 1:
        return _cp_reason(strategy, p, model, train)
    return None


def _tp_reason(strategy: Strategy, p: ParallelDims, model: ModelSpec, hw: HardwareSpec, train: TrainSpec,
               method: Method) -> str | None:
    if model.num_heads % p.tp or model.num_kv_heads % p.tp:
        ok = [d for d in _divisors(model.num_kv_heads) if model.num_heads % d == 0]
        return (f"parallel.tp {p.tp} does not divide the {model.num_heads} attention heads and "
                f"{model.num_kv_heads} kv heads: use tp in {ok}")
    if p.tp > hw.gpus_per_node and train.parallel.tp is None:
        return f"tp {p.tp} > {hw.gpus_per_node} GPUs per node: its per-layer all-reduces would cross nodes"
    if strategy.engine is Engine.DEEPSPEED and strategy.zero_stage == 3:
        return (f"DeepSpeed AutoTP runs with ZeRO-1/2 only, not {strategy.value}: use zero1/zero2 with tp, "
                "or fsdp_full_shard (FSDP2 + DTensor tp)")
    if strategy.engine is Engine.DEEPSPEED and strategy.offloads:
        return f"DeepSpeed AutoTP with ZeRO-Offload ({strategy.value}) is not supported here: use zero1/zero2 with tp"
    if strategy.engine is Engine.DEEPSPEED and p.cp > 1:
        return "DeepSpeed runs AutoTP and Ulysses sequence parallel separately: use tp or cp, not both"
    if method is Method.QLORA:
        return ("QLoRA's 4-bit weights (bitsandbytes Params4bit) cannot be split by tensor parallel: set "
                "parallel.tp 1 and shard with dp_shard / cp")
    if method is Method.LORA and strategy.engine is Engine.DEEPSPEED:
        # our FSDP2 runtime splits peft's lora_A / lora_B with their base layer (runtime/tensor_parallel.py,
        # tests/runtime/test_mesh_runs.py lora_tp2_dps2); DeepSpeed's AutoTP replaces the Linear modules
        # peft wrapped, untested here
        return ("LoRA with DeepSpeed AutoTP is not supported here: use fsdp_full_shard with tp (FSDP2 + DTensor "
                "splits the adapters with their layers) or parallel.tp 1")
    return None


def _cp_reason(strategy: Strategy, p: ParallelDims, model: ModelSpec, train: TrainSpec) -> str | None:
    if p.cp_mode is CpMode.ULYSSES:
        heads = model.num_heads // p.tp
        if heads % p.cp:
            return (f"Ulysses cp {p.cp} must divide the {heads} attention heads per tp rank: use a cp dividing "
                    f"{heads}, or parallel.cp_mode ring")
        if train.seq_len % p.cp:
            return f"train.seq_len {train.seq_len} is not a multiple of cp {p.cp}: pad to a multiple of {p.cp}"
        return None
    # ring (torch context_parallel): load-balanced halves per rank, and SDPA kernels with a sharding rule
    if strategy.engine is Engine.DEEPSPEED:
        return f"{strategy.value}: DeepSpeed has Ulysses sequence parallel only; set parallel.cp_mode ulysses"
    if train.seq_len % (2 * p.cp):
        return f"ring cp {p.cp} needs train.seq_len % {2 * p.cp} == 0 (two balanced chunks per rank)"
    if train.attention is Attention.EAGER:
        return ("ring cp patches scaled_dot_product_attention (flash / memory-efficient / cuDNN kernels): "
                "set train.attention sdpa")
    return None
