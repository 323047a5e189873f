"""The `why` lines about the device mesh: what the chosen mesh bought, against the best data-parallel-only
plan (pure; used by compiler/planner.py)."""
from __future__ import annotations

from shardtrain.compiler.plan import Candidate
from shardtrain.compiler.specs import CpMode, HardwareSpec, Strategy, TrainSpec
from shardtrain.units import fmt_bytes

_TERMS = ("params", "grads", "master_params", "optimizer_states", "activations", "logits", "buffers")


def _largest(c: Candidate) -> str:
    k = max(_TERMS, key=lambda t: getattr(c.per_gpu, t))
    return f"{k} {fmt_bytes(getattr(c.per_gpu, k))}"


def _what_it_divides(c: Candidate, t: TrainSpec) -> list[str]:
    m, out = c.mesh, []
    if m.tp > 1:
        out.append(f"tp {m.tp}: each rank holds 1/{m.tp} of every linear layer (weights, grads, optimizer states) "
                   f"and of the attention/MLP activations; 4 collectives per layer on the intra-node link")
    if m.cp > 1:
        how = ("Ulysses: 4 all-to-alls per layer, heads / cp per rank in attention"
               if m.cp_mode is CpMode.ULYSSES else "ring attention: K/V blocks pass around the cp ranks")
        out.append(f"cp {m.cp}: each rank holds {t.seq_len // m.cp:,} of the {t.seq_len:,} tokens of a sequence "
                   f"(activations and logits / {m.cp}; {how})")
    if m.is_hsdp:
        out.append(f"HSDP: model state sharded over {m.fsdp_shard} ranks, replicated {m.dp_replicate}×; "
                   "gradients reduce-scatter inside a shard group and all-reduce across replicas")
    return out


def mesh_reasons(train: TrainSpec, asked: TrainSpec, hw: HardwareSpec, c: Candidate,
                 candidates: list[Candidate]) -> list[str]:
    """Lines for `why`: the mesh, what it divides, and what it bought. Nothing for a plain
    data-parallel mesh the user left on auto (the table's mesh line shows it)."""
    m = c.mesh
    r: list[str] = []
    if asked.strategy is Strategy.FSDP_HYBRID_SHARD:
        r.append(f"strategy fsdp_hybrid_shard is fsdp_full_shard on the mesh {m.label()} (HSDP: shard inside a "
                 "replica group, replicate across them)")
    plain = m.is_data_parallel_only and not m.is_hsdp
    if plain and train.parallel.is_auto:
        return r
    forced = "" if train.parallel.is_auto else " (parallel: forced dims kept)"
    r.append(f"mesh {m.label()} = {m.world} ranks{forced}; {m.dp} data-parallel rank(s) take different samples")
    r += _what_it_divides(c, train)
    if plain:
        return r
    flat = [x for x in candidates if x.mesh.is_data_parallel_only]
    fit_flat = [x for x in flat if x.fits]
    req = train.parallel
    if not flat and ((req.tp or 1) > 1 or (req.cp or 1) > 1):
        r.append("tp/cp set in parallel: (no data-parallel-only mesh compared; leave them auto to let the planner "
                 "choose)")
    elif not flat:
        if train.global_batch_size < hw.world_size or train.global_batch_size % hw.world_size:
            r.append(f"without tp/cp the global batch of {train.global_batch_size:,} cannot spread over "
                     f"{hw.world_size:,} GPUs: every data-parallel rank needs whole sequences; tp × cp = "
                     f"{m.tp * m.cp} ranks share each one")
        else:
            r.append("without tp/cp no legal data-parallel plan exists for these settings")
    elif not fit_flat:
        least = min(flat, key=lambda x: x.per_gpu.total)
        r.append(f"without it the smallest data-parallel-only plan ({least.strategy.value}) needs "
                 f"{fmt_bytes(least.per_gpu.total)} per GPU (largest term: {_largest(least)})")
    else:
        best = min(fit_flat, key=lambda x: x.step_time_s)
        r.append(f"the fastest data-parallel-only plan that fits ({best.strategy.value}, ~{best.step_time_s:.3g} s) "
                 f"takes {best.step_time_s / c.step_time_s:.2f}x this step time")
    return r
