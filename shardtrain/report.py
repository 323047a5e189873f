"""Human-readable rendering of a Plan (a pure function returning a string)."""
from __future__ import annotations

from shardtrain.compiler.advice import fmt_step_time
from shardtrain.compiler.plan import MEMORY_TERMS, Candidate, Plan, Suggestion
from shardtrain.units import fmt_bytes


def _row(c: Candidate, best: float) -> str:
    mark = "fits" if c.fits else "OOM "
    mesh = "" if c.mesh.is_data_parallel_only and not c.mesh.is_hsdp else f"  {c.mesh.label()}"
    return (f"  {c.strategy.value:<19} {mark}  {fmt_bytes(c.per_gpu.total):>10}  mb {c.micro_batch_size:>3} × acc "
            f"{c.grad_accum_steps:>3}  ckpt {c.gradient_checkpointing.value:<9} {c.step_time_s / best:>6.2f}x{mesh}")


def _gpu_label(hw) -> str:
    """The preset's name, or "custom GPU" when --gpu-memory differs from that preset's memory (issue 12:
    "1 × h100-80gb (24.0 GiB each)" named a GPU that has no such memory)."""
    from shardtrain.config.presets import get_gpu_preset
    try:
        preset = get_gpu_preset(hw.gpu_name)
    except ValueError:
        return hw.gpu_name
    if preset.memory_bytes == hw.gpu_memory_bytes:
        return hw.gpu_name
    return f"custom GPU (--gpu-memory; {hw.gpu_name} speeds assumed)"


def _reported_lines(c: Candidate, expandable: bool) -> list[str]:
    """The peak as each tool reports it (compiler/allocator.py): published figures use one of these."""
    alloc = "expandable segments" if expandable else "default allocator, no expandable segments"
    rows = (("allocated", c.allocated_bytes, "torch.cuda.max_memory_allocated: total − cuda_context"),
            ("reserved (predicted)", c.reserved_bytes, f"max_memory_reserved; {alloc}"),
            ("nvidia-smi (predicted)", c.gpu_need_bytes, "reserved + cuda_context: the figure that must fit"))
    return [f"{'reported' if i == 0 else '':<11}{k:<23}{fmt_bytes(v):>10}  ({why})" for i, (k, v, why) in enumerate(rows)]


def suggestion_args(sug: Suggestion) -> str:
    """A suggestion as arguments to append to the command that planned: each key's flag where it has one
    (config/flags.py), else ``--set KEY=VALUE``. Flags beat --set, so ``--set train.method=lora`` appended
    to a command with ``--method full`` would change nothing; an appended flag wins (the last one counts)."""
    from shardtrain.config.flags import PLAN_FLAGS
    flag = {f.key: f.flag for f in PLAN_FLAGS}
    return " ".join(f"{flag[k]} {v}" if k in flag else f"--set {k}={v}" for k, v in sug.set)


def render_plan(plan: Plan, *, max_alternatives: int = 6) -> str:
    c, m, hw = plan.chosen, plan.model, plan.hardware
    out = []
    out.append(f"model      {m.name}: {m.num_params / 1e9:.3f}B params ({m.num_params:,}), "
               f"{c.trainable_params:,} trainable ({c.method.value}), {m.num_layers} layers")
    out.append(f"hardware   {hw.nodes} node(s) × {hw.gpus_per_node} {_gpu_label(hw)} "
               f"({fmt_bytes(hw.gpu_memory_bytes)} each, {fmt_bytes(plan.gpu_memory_bytes - plan.headroom_bytes)} "
               f"usable), host RAM {fmt_bytes(hw.cpu_memory_bytes)}/node"
               + (" (assumed: give --cpu-memory)" if "hardware.cpu_memory" in dict(plan.assumed) else "")
               + (f", NVMe {hw.nvme_path}" if hw.nvme_path else ""))
    out.append(f"job        seq {plan.train.seq_len}, global batch {plan.train.global_batch_size}, "
               f"{c.precision.value}, optimizer {c.optimizer.value}")
    status = "FITS" if c.fits else "DOES NOT FIT"
    out.append("")
    mesh = plan.parallel
    ranks = f"{c.world_size} ranks" if mesh.dp == c.world_size else f"{mesh.dp} data-parallel ranks"
    out.append(f"plan       {c.strategy.value}  [{status}]  micro batch {c.micro_batch_size} × accumulation "
               f"{c.grad_accum_steps} × {ranks}, gradient checkpointing "
               f"{c.gradient_checkpointing.value}")
    long_ctx = ([f"tiled MLP {c.tiled_mlp_tiles} tiles"] if c.tiled_mlp_tiles > 1 else []) + \
        (["checkpointed layer inputs in host RAM"] if c.ckpt_offload else [])
    if long_ctx:   # the long-context savers (compiler/savers.py), only when one is on
        out.append(f"savers     {', '.join(long_ctx)}")
    out.append(f"mesh       {mesh.label()}  (dp_replicate {mesh.dp_replicate} × dp_shard {mesh.dp_shard} × cp "
               f"{mesh.cp} × tp {mesh.tp} = {mesh.world} ranks"
               + ")")
    out.append("")
    out.append("per GPU    " + "term".ljust(18) + "bytes".rjust(16) + "      human")
    for k in MEMORY_TERMS:
        v = getattr(c.per_gpu, k)
        out.append(f"           {k:<18}{v:>16,}  {fmt_bytes(v):>10}")
    out.append(f"           {'total':<18}{c.per_gpu.total:>16,}  {fmt_bytes(c.per_gpu.total):>10}")
    out += _reported_lines(c, plan.hardware.expandable_segments)
    if c.per_phase:
        out.append("phases     " + "  ".join(f"{ph} {fmt_bytes(b.total)}" for ph, b in c.per_phase)
                   + f"  (peak: {c.peak_phase}; terms above are at the peak)")
    out.append(f"host RAM   {fmt_bytes(c.cpu_memory_per_node_bytes)} per node"
               + (f"; NVMe {fmt_bytes(c.nvme_bytes)} per node" if c.nvme_bytes else ""))
    out.append("")
    out.append("why")
    out += [f"  - {r}" for r in plan.reasons]
    if plan.alternatives:
        out.append("")
        out.append("alternatives (best per strategy; time relative to the plan)")
        for a in plan.alternatives[:max_alternatives]:
            out.append(_row(a, c.step_time_s))
    if plan.suggestions:
        out.append("")
        out.append("to fit, append one of these (each re-planned; cheapest first: same math, hardware, job)")
        for x in plan.suggestions:
            out.append(f"  {suggestion_args(x):<44} {x.kind.value:<8} {x.strategy.value:<17} "
                       f"{fmt_bytes(x.total_bytes):>10}/GPU  {fmt_step_time(x.step_time_s)}")
        if any(k == "hardware.nvme_path" for x in plan.suggestions for k, _ in x.set):
            out.append("  (--nvme-path: any local NVMe directory; plan does not read it)")
    return "\n".join(out)


def render_max(result) -> str:
    """`plan --max`: the answer line (compiler/maxfit.py MaxResult.sentence) above the plan at that value."""
    from shardtrain.compiler.maxfit import Limit
    r = result
    lines = [f"max        {r.sentence()}"]
    if r.limit in (Limit.HOST_RAM, Limit.NVME):
        lines.append(f"           (planned {r.plans_made} values; at {r.next_value:,}: {r.detail})")
    else:
        lines.append(f"           (planned {r.plans_made} values in steps of {r.step:,})")
    return "\n".join(lines) + "\n\n" + render_plan(r.plan)
