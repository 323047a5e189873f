"""The `why` lines of a plan (pure; compiler/planner.py calls plan_reasons; the mesh's own lines are
compiler/mesh_reasons.py)."""
from __future__ import annotations

from shardtrain.compiler.activations import logits_bytes
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.plan import Candidate
from shardtrain.compiler.specs import ActivationOffload, GradCkpt, HardwareSpec, LossMode, Strategy, TrainSpec
from shardtrain.units import fmt_bytes

# Strategies in order of increasing communication/offload cost: the tie-break and the "cheaper ones".
# fsdp_hybrid_shard is not searched as a strategy: it is fsdp_full_shard on a mesh with dp_replicate > 1
# (HSDP, compiler/mesh.py replicate_options); kept in the order for plans and flags that spell it.
STRATEGY_ORDER = (Strategy.DDP, Strategy.ZERO1, Strategy.ZERO2, Strategy.FSDP_SHARD_GRAD_OP,
                  Strategy.FSDP_HYBRID_SHARD, Strategy.FSDP_FULL_SHARD, Strategy.ZERO3,
                  Strategy.ZERO2_OFFLOAD, Strategy.ZERO3_OPT_OFFLOAD, Strategy.FSDP_OFFLOAD, Strategy.ZERO3_OFFLOAD,
                  Strategy.ZERO_INFINITY)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st ("every 2th layer", issue 22)."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def plan_reasons(model: ModelSpec, t: TrainSpec, hw: HardwareSpec, usable: int, c: Candidate,
                 best: dict[Strategy, Candidate], illegal: dict[Strategy, str], *, loss_why: str = "") -> list[str]:
    """The `why` lines of a plan: the strategy against the cheaper ones, checkpointing, the batch, the savers."""
    r = []
    if t.strategy is not None:
        r.append(f"strategy {c.strategy.value} was forced (--strategy); "
                 + ("it fits" if c.fits else "it does NOT fit: " + "; ".join(c.why_not)))
    elif not c.fits:
        r.append(f"nothing fits; {c.strategy.value} is the plan that needs the least GPU memory: "
                 + "; ".join(c.why_not))
    else:
        r.append(f"{c.strategy.value} is the fastest plan that fits: {fmt_bytes(c.gpu_need_bytes)} of "
                 f"{fmt_bytes(usable)} usable per GPU, ~{c.step_time_s:.3g} s per optimizer step")
    for s in STRATEGY_ORDER[:STRATEGY_ORDER.index(c.strategy)]:
        o = best.get(s)
        if o is not None and not o.fits:
            biggest = max(("params", "grads", "master_params", "optimizer_states", "activations", "logits"),
                          key=lambda k: getattr(o.per_gpu, k))
            r.append(f"not {s.value}: {'; '.join(o.why_not)} (largest term: {biggest} "
                     f"{fmt_bytes(getattr(o.per_gpu, biggest))})")
        elif o is not None and o.fits and t.strategy is None:
            r.append(f"not {s.value}: fits but is slower ({o.step_time_s / c.step_time_s:.3f}x the step time)")
        elif s in illegal and t.strategy is None:
            r.append(f"not {s.value}: {illegal[s]}")
    r += _host_offload_reasons(c)
    ck = {GradCkpt.NONE: "off: activations fit without recomputation",
          GradCkpt.SELECTIVE: f"selective (every {ordinal(t.selective_every)} layer): the cheapest recomputation "
                             "that fits",
          GradCkpt.OP: "op (every layer keeps every other matmul's and attention's outputs, torchtitan's op "
                       "policy): needed to fit, less recomputation than full",
          GradCkpt.FULL: "full: needed to fit activations (~33% more compute)"}[c.gradient_checkpointing]
    r.append(f"gradient checkpointing {ck}")
    r.append(f"global batch {t.global_batch_size} = micro batch {c.micro_batch_size} × accumulation "
             f"{c.grad_accum_steps} × {c.mesh.dp} data-parallel ranks")
    if c.optimizer is not t.optimizer:
        r.append(f"optimizer switched to {c.optimizer.value} (allow_optimizer_change) to fit")
    if c.method is not t.method:
        r.append(f"method switched to {c.method.value} (allow_method_change) to fit")
    r += _memory_saver_reasons(model, t, c, loss_why)
    if c.fsdp_defer_grad_sync:
        r.append("FSDP gradient sync deferred to the last micro-step (set_requires_gradient_sync): "
                 "fewer reduce-scatters, unsharded fp32 grads held meanwhile")
    return r


def _host_offload_reasons(c: Candidate) -> list[str]:
    """What the two host-offload strategies of issue 19 keep where (compiler/memory.py)."""
    host = fmt_bytes(c.cpu_memory_per_node_bytes)
    if c.strategy is Strategy.FSDP_OFFLOAD:
        return [f"fsdp_offload (FSDP2 CPUOffloadPolicy): sharded params, gradients and the optimizer step in host "
                f"RAM ({host} per node, pinned), the GPU holds only the layers being gathered; every micro-step "
                "copies the shards in over PCIe for the forward and again for the backward, and the grads out"]
    if c.strategy is Strategy.ZERO3_OPT_OFFLOAD:
        return [f"zero3_opt_offload: 16-bit parameter partitions stay on the GPU; fp32 master weights, optimizer "
                f"states, gradient partitions and the step (DeepSpeedCPUAdam) in host RAM ({host} per node)"]
    return []


def _memory_saver_reasons(model: ModelSpec, t: TrainSpec, c: Candidate, loss_why: str = "") -> list[str]:
    """Why the loss path and activation offload are what they are."""
    r = []
    kw = dict(micro_batch=c.micro_batch_size, seq_len=t.seq_len, precision=t.precision,
              chunk_tokens=t.loss_chunk_tokens, parallel=c.mesh)
    full = logits_bytes(model, loss=LossMode.FULL, **kw)
    chunked = logits_bytes(model, loss=LossMode.CHUNKED, **kw)
    if c.loss is LossMode.CHUNKED:
        how = f"loss auto → chunked ({loss_why})" if t.loss is LossMode.AUTO else "loss chunked"
        r.append(f"{how}: lm_head + fp32 cross-entropy in chunks of {t.loss_chunk_tokens} tokens, logits term "
                 f"{fmt_bytes(chunked)} instead of {fmt_bytes(full)} for the full fp32 logits "
                 "(the runtime recomputes one chunk's projection in backward)")
    elif t.loss is LossMode.AUTO:
        r.append(f"loss auto → full ({fmt_bytes(full)} logits path): {loss_why}")
    elif full > chunked and not c.fits:
        r.append(f"loss full: the full fp32 logits path needs {fmt_bytes(full)}; loss: chunked would need "
                 f"{fmt_bytes(chunked)}")
    if c.activation_offload is ActivationOffload.CPU:
        r.append("activations offloaded to host RAM (save_on_cpu): no faster plan fits; the GPU keeps one "
                 "layer's working set, each micro-step moves the saved activations over PCIe twice")
    elif t.activation_offload is ActivationOffload.CPU:
        r.append("activation offload allowed but not used: a plan without the PCIe round trip fits and is faster")
    from shardtrain.compiler.saver_reasons import long_context_reasons  # tiled MLP, checkpoint offload
    return r + long_context_reasons(model, t, c)
