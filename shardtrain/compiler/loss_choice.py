"""Why `loss: auto` (the default) chose what it chose: the `why` line of the loss path.

The planner evaluates every candidate with both loss paths (compiler/planner.py): the full path (HF
ForCausalLMLoss: the whole fp32 logits) and the chunked one (lm_head + fp32 cross-entropy per chunk
under checkpointing: shardtrain/runtime/loss.py; torchtune CEWithChunkedOutputLoss). Chunked recomputes
each chunk's projection in backward (+2·h·V FLOPs per token, compiler/cost.py), so at equal settings the
full path is faster; chunked wins exactly when it lets a faster plan fit (a larger micro batch, less
recomputation, a cheaper strategy) or when no full-path plan fits at all.
"""
from __future__ import annotations

from shardtrain.compiler.plan import Candidate
from shardtrain.compiler.specs import LossMode, Runner
from shardtrain.units import fmt_bytes


def _settings(c: Candidate) -> str:
    return (f"{c.strategy.value}, micro batch {c.micro_batch_size}, checkpointing "
            f"{c.gradient_checkpointing.value}")


def loss_auto_reason(chosen: Candidate, candidates: list[Candidate], runner: Runner = Runner.SHARDTRAIN) -> str:
    """The reason for ``chosen.loss`` under loss auto, against the best candidate of the other path
    (``candidates``: every evaluated candidate of both paths). ``runner``: what runs the plan (the HF
    runners chunk with Liger's fused linear cross-entropy: emit/trainer.py)."""
    other = LossMode.FULL if chosen.loss is LossMode.CHUNKED else LossMode.CHUNKED
    rivals = [c for c in candidates if c.loss is other]
    fitting = [c for c in rivals if c.fits]
    if not chosen.fits:
        return f"nothing fits with either path; the {chosen.loss.value} one needs the least memory"
    if chosen.loss is LossMode.CHUNKED:
        if not fitting:
            least = min(rivals, key=lambda c: c.per_gpu.total, default=None)
            need = f" (its least: {fmt_bytes(least.per_gpu.total)} per GPU)" if least else ""
            return "the full fp32 logits path does not fit" + need
        best = min(fitting, key=lambda c: c.step_time_s)
        via = " (Liger fused linear cross-entropy)" if runner is not Runner.SHARDTRAIN else ""
        return (f"it lets a faster plan fit{via}: {_settings(chosen)} at ~{chosen.step_time_s:.3g} s per step; the "
                f"full path's fastest fit is {_settings(best)} at ~{best.step_time_s:.3g} s")
    return ("the full path fits and is faster (chunked recomputes each chunk's lm_head in backward); no "
            "chunked plan is faster")
